"""The layer groups of an encoder, input to output: what layer-wise learning-rate decay (`optim.layer_decay`) and
partial fine-tuning (`optim.freeze_stages`) count in.

A group is a stage of a CNN (its stem, each resolution stage) or a ViT's embedding and each of its blocks: the unit
in which pretrained features grow more specific from input to output (BEiT's layer-wise decay counts ViT blocks;
partial fine-tuning freezes whole stages). Every parameter of the encoder lands in exactly one group; one that
matches none (a backbone this table does not know, or a new submodule) is refused by name instead of being silently
trained at the head's learning rate.
"""
from __future__ import annotations

from torch import nn


def _vit(encoder: nn.Module) -> list[tuple[str, ...]]:
    """Patch embedding (+ position embedding, pre-norm), then one group per block, the final norm with the last."""
    blocks = [(f"blocks.{i}.",) for i in range(len(encoder.blocks))]
    blocks[-1] = (*blocks[-1], "norm.")
    return [("patch_embed.", "pos_embed", "norm_pre."), *blocks]


def _convnext(encoder: nn.Module) -> list[tuple[str, ...]]:
    stages = [(f"stages.{i}.",) for i in range(len(encoder.stages))]
    stages[-1] = (*stages[-1], "norm.")
    return [("stem.",), *stages]


GROUP_PREFIXES = {
    "small": lambda encoder: [(f"{i}.",) for i in range(len(encoder))],
    "resnet18": lambda encoder: [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)],
    "vit_tiny": _vit,
    "vit_small": _vit,
    "convnext_nano": _convnext,
}
"""Backbone name -> its groups as parameter-name prefixes, input to output."""


def layer_groups(encoder: nn.Module, name: str) -> list[list[str]]:
    """The parameter names of `encoder` (backbone `name`) in layer groups, input to output."""
    if name not in GROUP_PREFIXES:
        raise ValueError(f"model.encoder.name={name!r}: no layer groups are declared for it (layer-wise decay and "
                         f"partial fine-tuning know {', '.join(GROUP_PREFIXES)})")
    prefixes = GROUP_PREFIXES[name](encoder)
    groups: list[list[str]] = [[] for _ in prefixes]
    for param_name, _ in encoder.named_parameters():
        owners = [i for i, group in enumerate(prefixes) if param_name.startswith(group)]
        if len(owners) != 1:
            raise ValueError(f"encoder {name}: parameter {param_name!r} is in {len(owners)} layer groups, expected "
                             "exactly one")
        groups[owners[0]].append(param_name)
    return groups
