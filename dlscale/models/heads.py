"""Task heads on top of an encoder's feature map: reconstruction, classification, lens-parameter regression."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dlscale.models.cnn_backbones import conv_bn_relu


def global_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C) by global average pooling; (B, C) passes through, so heads take either."""
    return feature_map.mean(dim=(2, 3)) if feature_map.dim() == 4 else feature_map


class ImageHead(nn.Module):
    """A reconstruction head: `stages` map the feature map to an image, a bilinear resize lands on `out_shape`."""
    out_shape: tuple[int, int, int]
    stages: nn.Sequential

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        image = self.stages(feature_map)
        if image.shape[-2:] != self.out_shape[1:]:
            image = F.interpolate(image, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return image


class Decoder(ImageHead):
    """Rebuild an image of exactly `out_shape` from a feature map `scale` times smaller, at a fraction of the
    encoder's cost (reconstruction is a pretext task: this decoder is thrown away after pre-training).

    A 1x1 conv first narrows the map to `width` channels. Each of the d = floor(log2(scale / out_stride)) doublings
    but the last is a bilinear upsample + one 3x3 conv (no checkerboard artefacts) halving the channels down to
    `min_channels`; the last is a sub-pixel conv (3x3 conv to 4x the image channels + pixel shuffle), so no layer
    runs at full resolution. A bilinear resize then lands on `out_shape`: it covers scales that are not powers of
    two (a ViT's patch 10), sizes that are not multiples of `scale` (150x150 from a 5x5 map) and `out_stride` > 1,
    which reconstructs at 1/out_stride of the resolution and upsamples (cheaper still, but fine detail is then not
    learned). No final activation: inputs may be normalised to [0, 1] or standardised.
    """

    def __init__(self, in_channels: int, out_shape: tuple[int, int, int], scale: int = 32, width: int = 32,
                 min_channels: int = 8, out_stride: int = 1) -> None:
        super().__init__()
        if scale < 1 or out_stride < 1:
            raise ValueError(f"decoder scale and out_stride must be >= 1, got scale={scale}, out_stride={out_stride}")
        if width < 1 or min_channels < 1:
            raise ValueError(f"decoder width and min_channels must be >= 1, got {width} and {min_channels}")
        self.out_shape = tuple(out_shape)
        image_channels = self.out_shape[0]
        channels = min(width, in_channels)
        stages: list[nn.Module] = [nn.Conv2d(in_channels, channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        doublings = max(scale // out_stride, 1).bit_length() - 1
        upsampling, channels = doubling_stages(channels, max(doublings - 1, 0), min_channels)
        stages += upsampling
        if doublings:
            last = nn.Conv2d(channels, 4 * image_channels, kernel_size=3, padding=1)
            with torch.no_grad():   # the 4 sub-pixels start equal: no checkerboard at initialisation
                last.weight.copy_(last.weight.view(image_channels, 4, -1)[:, :1].expand(-1, 4, -1)
                                  .reshape_as(last.weight))
                last.bias.copy_(last.bias.view(image_channels, 4)[:, :1].expand(-1, 4).reshape(-1))
            stages += [last, nn.PixelShuffle(2)]
        else:
            stages.append(nn.Conv2d(channels, image_channels, kernel_size=3, padding=1))
        self.stages = nn.Sequential(*stages)


def doubling_stages(channels: int, doublings: int, min_channels: int) -> tuple[list[nn.Module], int]:
    """`doublings` x (bilinear 2x upsample, 3x3 conv-BN-ReLU halving the channels down to `min_channels`); the
    stages and the channels they end with."""
    stages: list[nn.Module] = []
    for _ in range(doublings):
        next_channels = max(channels // 2, min_channels)
        stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                   conv_bn_relu(channels, next_channels)]
        channels = next_channels
    return stages, channels


class WideDecoder(ImageHead):
    """The reconstruction head of dlscale 0.1, kept so that its run directories still load (their config.yaml
    selects it): one bilinear upsample + 3x3 conv per doubling, channels halving from the encoder's down to
    `min_channels`, a last 3x3 conv, a bilinear resize to `out_shape`. About 5x the light `Decoder`'s cost on CPU."""

    def __init__(self, in_channels: int, out_shape: tuple[int, int, int], scale: int = 32,
                 min_channels: int = 16) -> None:
        super().__init__()
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"the wide decoder's scale must be a power of two, got {scale}")
        self.out_shape = tuple(out_shape)
        stages, channels = doubling_stages(in_channels, scale.bit_length() - 1, min_channels)
        stages.append(nn.Conv2d(channels, self.out_shape[0], kernel_size=3, padding=1))
        self.stages = nn.Sequential(*stages)


class ClassifierHead(nn.Module):
    """Global average pool, optional standardisation of the pooled features, optional dropout, linear layer to class
    logits. Standardising (BatchNorm without affine parameters) is what a linear probe does to its inputs: a
    pretrained encoder's pooled features can be far from unit scale, and a fresh linear layer on them then learns
    slowly enough that fine-tuning on a few labels stalls at chance."""

    def __init__(self, in_channels: int, n_classes: int, dropout: float = 0.0, standardize: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_channels, affine=False) if standardize else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_channels, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.norm(global_pool(features))))


class RegressionHead(nn.Module):
    """Global average pool, linear layer to lens parameters (e.g. theta_E, e1, e2), in the targets' own units."""

    def __init__(self, in_channels: int, n_targets: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, n_targets)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(global_pool(features))
