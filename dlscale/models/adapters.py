"""LoRA adapters (Hu et al. 2022) on an encoder's linear layers, through `peft`: the pretrained weights stay frozen,
low-rank updates beside them train, which keeps the pretrained features where few labels would distort them.

The adapters live in the training run only (its checkpoints hold them, so a run resumes with them); the exported
model.pt / encoder.pt hold their merged weights under the plain names, so `dlscale eval`, `predict` and a later
`init_from` read them as any encoder.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn


@dataclass
class LoRAConfig:
    rank: int = 0
    """rank of each adapter; 0 = no adapters (the whole encoder trains as configured)"""
    alpha: float = 16.0
    """scale of the update: alpha / sqrt(rank) (rank-stabilised LoRA, Kalajdzievski 2023)"""
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    """encoder modules that get adapters, by the end of their name (a timm ViT's attention projections)"""

    def validate(self) -> "LoRAConfig":
        if self.rank < 0 or self.alpha <= 0 or not self.targets:
            raise ValueError(f"model.lora: rank={self.rank}, alpha={self.alpha}, targets={self.targets}: expected a "
                             "rank >= 0, alpha > 0 and at least one target module")
        return self


def add_adapters(encoder: nn.Module, cfg: LoRAConfig, name: str) -> nn.Module:
    """Put adapters of rank `cfg.rank` on `encoder`'s target modules (in place) and freeze every other encoder
    parameter; nothing with rank 0. Raises naming the encoder (`name`) when no module matches."""
    if cfg.rank == 0:
        return encoder
    from peft import LoraConfig, inject_adapter_in_model
    matches = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and
               any(n == t or n.endswith("." + t) for t in cfg.targets)]
    if not matches:
        raise ValueError(f"model.lora.targets={cfg.targets}: encoder {name} has no linear layer of that name (LoRA "
                         "adapters are for the ViT encoders)")
    inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
                                       use_rslora=True, lora_dropout=0.0), encoder)
    for param_name, param in encoder.named_parameters():
        param.requires_grad_("lora_" in param_name)
    return encoder


def merged(model: nn.Module) -> nn.Module:
    """`model` itself without adapters, else a copy with every adapter folded into its layer's weight and the plain
    layer back in its place (the names and modules of a model that never had adapters)."""
    if not any("lora_" in n for n, _ in model.named_parameters()):   # (peft is imported only where adapters are)
        return model
    from peft.tuners.lora import LoraLayer
    layers = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    out = copy.deepcopy(model)
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name)
        layer = getattr(parent, child)
        layer.merge()
        base = layer.get_base_layer()
        for param in base.parameters():
            param.requires_grad_(True)
        setattr(parent, child, base)
    return out
