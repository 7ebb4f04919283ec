"""Task heads on top of an encoder's feature map: reconstruction, classification, lens-parameter regression."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dlscale.models.encoders import conv_bn_relu


def global_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C) by global average pooling; (B, C) passes through, so heads take either."""
    return feature_map.mean(dim=(2, 3)) if feature_map.dim() == 4 else feature_map


class Decoder(nn.Module):
    """Rebuild an image of exactly `out_shape` from a feature map `scale` times smaller.

    Each of log2(scale) stages doubles the size (bilinear upsample + conv, which avoids the checkerboard artefacts
    of transposed convs) and halves the channels. A last bilinear resize lands on sizes that are not multiples of
    `scale` (150x150 from a 5x5 map). No final activation: inputs may be normalised to [0, 1] or standardised.
    """

    def __init__(
        self, in_channels: int, out_shape: tuple[int, int, int], scale: int = 32, min_channels: int = 16
    ) -> None:
        super().__init__()
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"decoder scale must be a power of two, got {scale}")
        self.out_shape = tuple(out_shape)
        stages: list[nn.Module] = []
        channels = in_channels
        for _ in range(scale.bit_length() - 1):
            next_channels = max(channels // 2, min_channels)
            stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       conv_bn_relu(channels, next_channels)]
            channels = next_channels
        stages.append(nn.Conv2d(channels, self.out_shape[0], kernel_size=3, padding=1))
        self.stages = nn.Sequential(*stages)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        image = self.stages(feature_map)
        if image.shape[-2:] != self.out_shape[1:]:
            image = F.interpolate(image, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return image


class ClassifierHead(nn.Module):
    """Global average pool, optional dropout, linear layer to class logits."""

    def __init__(self, in_channels: int, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_channels, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(global_pool(features)))


class RegressionHead(nn.Module):
    """Global average pool, linear layer to lens parameters (e.g. theta_E, e1, e2), in the targets' own units."""

    def __init__(self, in_channels: int, n_targets: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, n_targets)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(global_pool(features))
