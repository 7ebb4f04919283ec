"""The timm backbones: ViT-Ti / ViT-S at the image and patch size, and ConvNeXt-Nano (timm is imported when one is
built: it takes a while and only these runs need it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dlscale.models.backbone import Backbone, EncoderConfig, register_backbone

VIT_ARCHITECTURES: dict[str, str] = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}
"""Our ViT names -> the timm architecture (depth, width, heads) they take; image and patch size are ours."""


def default_patch_size(height: int, width: int) -> int:
    """The patch side in 8..16 dividing both sides that is nearest to side / 15: 8 up to 120 pixels (64x64 -> an 8x8
    grid), 10 for the 150x150 DeepLense images (15x15). Small lensing images need small patches: timm's 16 would
    leave 16 coarse tokens on a 64x64 image."""
    common, target = math.gcd(height, width), max(height, width) / 15
    fitting = [p for p in range(8, 17) if common % p == 0]
    if not fitting:
        raise ValueError(f"no default patch size for {height}x{width} images (none of 8..16 divides both sides): "
                         "set model.encoder.patch_size")
    return min(fitting, key=lambda p: (abs(p - target), p))


def check_patch_size(patch_size: int, height: int, width: int, field: str = "model.encoder.patch_size") -> None:
    """Raise naming `field` unless `patch_size` divides both image sides (ViTs and MAE masks tile the image)."""
    if patch_size < 1 or height % patch_size or width % patch_size:
        common = math.gcd(height, width)
        choices = [p for p in range(2, min(common, 32) + 1) if common % p == 0]
        raise ValueError(f"{field}={patch_size} must divide the image size {height}x{width}; "
                         f"divisors that fit: {choices or 'none (crop or pad the images)'}")


@dataclass
class ViTConfig(EncoderConfig):
    """Options of the ViTs (`vit_tiny`, `vit_small`)."""
    patch_size: int | None = None
    """Side of the square patches, dividing both image sides. None: the divisor in 8..16 nearest to side / 15, i.e.
    8 for 64x64 images (8x8 grid), 10 for 150x150 (15x15 grid)."""


class ViTEncoder(Backbone, nn.Module):
    """timm Vision Transformer without class token or classifier; its patch tokens form the feature map.

    Submodule names are timm's (`patch_embed`, `pos_embed`, `blocks`, `norm`). No class token: the heads pool the
    patch tokens (a class token would be trained by attention alone, and MAE reconstructs patches only).
    Registered once per size (`ViTTinyEncoder`, `ViTSmallEncoder`: `VIT_ARCHITECTURES`).
    """
    family, Config, needs_image_shape = "ViT", ViTConfig, True

    @classmethod
    def from_config(cls, cfg: ViTConfig, image_shape=None) -> "ViTEncoder":
        return cls(VIT_ARCHITECTURES[cls.name], tuple(image_shape), cfg.patch_size)

    @classmethod
    def arch_label(cls, cfg: ViTConfig) -> str:
        return f"{cfg.name}-p{cfg.patch_size}" if cfg.patch_size else cfg.name

    @classmethod
    def timm_recipe(cls, cfg: ViTConfig, image_shape) -> dict | None:
        """timm's ViT without class token and head, at our image and patch size (None without the image shape)."""
        if not image_shape:
            return None
        channels, height, width = image_shape
        return {"model": VIT_ARCHITECTURES[cls.name], "rename": [],
                "kwargs": {"img_size": [height, width], "patch_size": cfg.patch_size or default_patch_size(height,
                                                                                                        width),
                           "in_chans": channels, "num_classes": 0, "class_token": False, "global_pool": ""}}

    def layer_paths(self) -> list[list[str]]:
        return [["patch_embed", "pos_embed", "norm_pre"], *([f"blocks.{i}"] for i in range(len(self.blocks))),
                ["norm"]]

    def __init__(self, architecture: str, image_shape: tuple[int, int, int], patch_size: int | None = None) -> None:
        super().__init__()
        import timm  # imported here: it takes a while and only ViT/ConvNeXt runs need it

        channels, height, width = image_shape
        patch_size = default_patch_size(height, width) if patch_size is None else patch_size
        check_patch_size(patch_size, height, width)
        vit = timm.create_model(architecture, pretrained=False, img_size=(height, width), patch_size=patch_size,
                                in_chans=channels, num_classes=0, class_token=False, global_pool="")
        if vit.num_prefix_tokens:
            raise ValueError(f"timm {architecture} still has {vit.num_prefix_tokens} prefix tokens")
        self.patch_embed, self.pos_embed, self.pos_drop = vit.patch_embed, vit.pos_embed, vit.pos_drop
        self.norm_pre, self.blocks, self.norm = vit.norm_pre, vit.blocks, vit.norm
        self.patch_size: int = patch_size
        self.grid_size: tuple[int, int] = (height // patch_size, width // patch_size)
        self.out_channels: int = vit.embed_dim
        self.downsample: int = patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def _transform(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.norm_pre(self.pos_drop(tokens))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self._transform(self.patch_embed(x) + self.pos_embed)           # (B, N, D), N in row-major order
        return tokens.transpose(1, 2).reshape(x.shape[0], self.out_channels, *self.grid_size)

    def forward_visible(self, x: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """Encode only the patches `keep_index` (B, n_keep) names, with their position embeddings: the MAE encoder,
        whose cost scales with the visible patches. Returns (B, n_keep, D) tokens in `keep_index` order."""
        tokens = self.patch_embed(x) + self.pos_embed
        index = keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return self._transform(torch.gather(tokens, 1, index))


@register_backbone
class ViTTinyEncoder(ViTEncoder):
    """ViT-Ti (timm `vit_tiny_patch16_224`'s depth, width and heads) at the image and patch size."""
    name = "vit_tiny"


@register_backbone
class ViTSmallEncoder(ViTEncoder):
    """ViT-S (timm `vit_small_patch16_224`'s depth, width and heads) at the image and patch size."""
    name = "vit_small"


@register_backbone
class ConvNeXtEncoder(Backbone, nn.Module):
    """timm ConvNeXt-Nano trunk; the head's LayerNorm is applied to the map instead of to the pooled vector.

    Inputs are zero-padded to a multiple of 32 (150 -> 160), so the map side is ceil(H / 32) like the other CNNs'
    (the stride-4 stem would otherwise drop the border pixels).
    """
    name, family = "convnext_nano", "ConvNeXt"

    @classmethod
    def from_config(cls, cfg: EncoderConfig, image_shape=None) -> "ConvNeXtEncoder":
        return cls(cfg.in_channels)

    @classmethod
    def timm_recipe(cls, cfg: EncoderConfig, image_shape) -> dict:
        """The final LayerNorm is timm's `head.norm` (applied to the map, before pooling)."""
        return {"model": "convnext_nano", "rename": [["norm.", "head.norm."]],
                "kwargs": {"in_chans": cfg.in_channels, "num_classes": 0}}

    def layer_paths(self) -> list[list[str]]:
        return [["stem"], *([f"stages.{i}"] for i in range(len(self.stages))), ["norm"]]

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        import timm

        net = timm.create_model("convnext_nano", pretrained=False, in_chans=in_channels, num_classes=0)
        self.stem, self.stages, self.norm = net.stem, net.stages, net.head.norm
        self.out_channels: int = net.num_features
        self.downsample: int = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (-x.shape[-2]) % self.downsample, (-x.shape[-1]) % self.downsample
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return self.norm(self.stages(self.stem(x)))
