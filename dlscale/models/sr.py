"""Super-resolution: a residual network on top of bicubic upsampling, the degradations that make its low-resolution
inputs, its losses and its scores.

The network (`SRNet`, EDSR / RCAN-like) predicts only what bicubic misses: a conv path at the low resolution
(head conv, residual blocks, a body conv and a global skip), one sub-pixel step (conv to 4x the channels +
`PixelShuffle(2)`) per doubling, added to the bicubic upsample of the input. The last conv starts at zero, so a
fresh network returns bicubic exactly and training starts from bicubic's score. The output is linear: lensing images
are mostly near zero, where a sigmoid saturates; scores clamp it to [0, 1] (`sr_scores`), training does not.

An encoder's feature map may guide it (`guide_channels` > 0): a 1x1 conv maps the map to the trunk's width, it is
resized to the low-resolution grid and added after the head conv; the encoder sees the bicubic upsample at the size
it was trained on. (Only the last conv starts at zero: the gradient reaches the trunk, guidance and encoder from the
second step on.)

Pairs: the high-resolution image is scaled to [0, 1] per image (`unit_range`: min-max, so any affine normalisation
of the input gives the same pair); a registered degradation (`DEGRADATIONS`) makes its low-resolution version.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from dlscale.registry import Registry

SCALES = (2, 4)
MIN_LOW_SIDE = 4
"""Smallest low-resolution side the network is built for."""
SSIM_WINDOW = 11
"""torchmetrics' default Gaussian window: the high-resolution side must be at least this."""


@dataclass
class SRConfig:
    """The super-resolution network."""
    scale: int = 2
    """Upsampling factor: 2 or 4 (one PixelShuffle(2) step per doubling)."""
    channels: int = 32
    """Width of the low-resolution conv path."""
    blocks: int = 4
    """Residual blocks of the conv path."""
    block: str = "residual"
    """residual (EDSR: conv-ReLU-conv) | attention (RCAN: + channel attention) | any registered block."""
    reduction: int = 8
    """attention blocks: channel reduction of the squeeze-excitation bottleneck."""
    res_scale: float = 1.0
    """Multiplier of each block's residual (EDSR uses 0.1 for very deep, wide trunks)."""

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"superres scale={self.scale}: expected one of {SCALES}")
        if self.channels < 1 or self.blocks < 0 or self.reduction < 1:
            raise ValueError(f"superres channels={self.channels}, blocks={self.blocks}, reduction={self.reduction}: "
                             "expected channels >= 1, blocks >= 0, reduction >= 1")
        SR_BLOCKS.get_class(self.block)


@dataclass
class DegradationConfig:
    """How a high-resolution image becomes the network's low-resolution input."""
    name: str = "bicubic"
    """bicubic (antialiased bicubic downsampling, the benchmarks' protocol) | psf (Gaussian PSF blur of the
    high-resolution image, then the same downsampling, then Gaussian read noise) | any registered degradation."""
    psf_fwhm: float = 2.0
    """psf: full width at half maximum of the Gaussian PSF, in high-resolution pixels."""
    noise_std: float = 0.0
    """psf: standard deviation of the Gaussian noise added to the low-resolution image ([0, 1] units)."""

    def __post_init__(self) -> None:
        DEGRADATIONS.get_class(self.name)
        if self.psf_fwhm <= 0 or self.noise_std < 0:
            raise ValueError(f"degradation psf_fwhm={self.psf_fwhm}, noise_std={self.noise_std}: expected "
                             "psf_fwhm > 0 and noise_std >= 0")


def check_side(height: int, width: int, scale: int, where: str) -> None:
    """Refuse high-resolution sides that `scale` does not divide or that are too small to score."""
    if height % scale or width % scale:
        raise ValueError(f"{where}: images of {height}x{width} are not divisible by the super-resolution scale "
                         f"{scale}")
    if min(height, width) // scale < MIN_LOW_SIDE or min(height, width) < SSIM_WINDOW:
        raise ValueError(f"{where}: images of {height}x{width} are too small for {scale}x super-resolution (the "
                         f"low-resolution side must be >= {MIN_LOW_SIDE}, the high-resolution >= {SSIM_WINDOW})")


def unit_range(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images min-max scaled to [0, 1] per image, each image's minimum, its range): images = unit * span + low."""
    flat = images.float().flatten(1)
    low = flat.amin(1)[:, None, None, None]
    span = (flat.amax(1)[:, None, None, None] - low).clamp_min(1e-12)
    return (images.float() - low) / span, low, span


def bicubic_up(low: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(low, scale_factor=scale, mode="bicubic", align_corners=False)


def bicubic_down(high: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downsampling (PIL / MATLAB `imresize` style): the standard SR degradation."""
    size = (high.shape[-2] // scale, high.shape[-1] // scale)
    return F.interpolate(high, size=size, mode="bicubic", align_corners=False, antialias=True)


class Degradation:
    """Base of a registered degradation: `__call__(high, scale, generator)` -> the low-resolution images."""
    name: ClassVar[str] = ""
    random: ClassVar[bool] = False
    """Whether it draws random numbers (then training passes a seeded generator)."""

    def __init__(self, cfg: DegradationConfig) -> None:
        self.cfg = cfg

    def __call__(self, high: torch.Tensor, scale: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


DEGRADATIONS: Registry[Degradation] = Registry("degradation")


@DEGRADATIONS.register
class BicubicDegradation(Degradation):
    name = "bicubic"

    def __call__(self, high, scale, generator=None):
        return bicubic_down(high, scale)


@DEGRADATIONS.register
class PSFDegradation(Degradation):
    """An instrument's view: Gaussian PSF, pixels `scale` times larger, Gaussian noise."""
    name = "psf"
    random = True

    def __call__(self, high, scale, generator=None):
        from torchvision.transforms.functional import gaussian_blur
        sigma = self.cfg.psf_fwhm / (2 * math.sqrt(2 * math.log(2)))
        size = 2 * math.ceil(3 * sigma) + 1
        low = bicubic_down(gaussian_blur(high, [size, size], [sigma, sigma]), scale)
        if self.cfg.noise_std:
            low = low + self.cfg.noise_std * torch.randn(low.shape, generator=generator, device=low.device)
        return low


def degradation(cfg: DegradationConfig) -> Degradation:
    return DEGRADATIONS.get_class(cfg.name)(cfg)


class ResidualBlock(nn.Module):
    """EDSR's block: conv-ReLU-conv, no normalisation, scaled residual."""
    name = "residual"

    def __init__(self, channels: int, cfg: SRConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.res_scale = cfg.res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.body(x)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate of RCAN's channel attention (Zhang et al. 2018)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class AttentionBlock(ResidualBlock):
    """RCAN's residual channel-attention block."""
    name = "attention"

    def __init__(self, channels: int, cfg: SRConfig) -> None:
        super().__init__(channels, cfg)
        self.body.append(ChannelAttention(channels, cfg.reduction))


SR_BLOCKS: Registry[nn.Module] = Registry("super-resolution block")
SR_BLOCKS.register(ResidualBlock)
SR_BLOCKS.register(AttentionBlock)


class SRNet(nn.Module):
    """`forward(low, guide=None)` -> the (B, C, scale*h, scale*w) super-resolved images (see the module docstring).
    `guide`: the (B, guide_channels, h', w') feature map of an encoder, required when `guide_channels` > 0."""

    def __init__(self, cfg: SRConfig, image_channels: int = 1, guide_channels: int = 0) -> None:
        super().__init__()
        self.cfg, width = cfg, cfg.channels
        self.head = nn.Conv2d(image_channels, width, 3, padding=1)
        block = SR_BLOCKS.get_class(cfg.block)
        self.body = nn.Sequential(*(block(width, cfg) for _ in range(cfg.blocks)),
                                  nn.Conv2d(width, width, 3, padding=1))
        self.guide = nn.Conv2d(guide_channels, width, 1) if guide_channels else None
        doublings = cfg.scale.bit_length() - 1
        tail: list[nn.Module] = []
        for _ in range(doublings - 1):
            tail += [nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(inplace=True)]
        last = nn.Conv2d(width, 4 * image_channels, 3, padding=1)
        tail += [last, nn.PixelShuffle(2)]
        self.tail = nn.Sequential(*tail)
        nn.init.zeros_(last.weight)     # a fresh network is bicubic
        nn.init.zeros_(last.bias)

    def forward(self, low: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        if (guide is None) != (self.guide is None):
            raise ValueError("SRNet: a guided network needs its encoder's feature map, an unguided one takes none")
        x = self.head(low)
        if guide is not None:
            x = x + F.interpolate(self.guide(guide.to(x.dtype)), size=low.shape[-2:], mode="bilinear",
                                  align_corners=False)
        return bicubic_up(low, self.cfg.scale) + self.tail(x + self.body(x))


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """A smooth L1 (Lai et al. 2017): sqrt(d^2 + eps^2), eps in [0, 1] image units."""
    return torch.sqrt((pred - target).square() + eps * eps).mean()


SR_LOSSES = {"l1": F.l1_loss, "charbonnier": charbonnier}
"""Pixel losses of super-resolution training, by name."""


def sr_loss(pred: torch.Tensor, target: torch.Tensor, pixel: str = "l1", ssim_weight: float = 0.0) -> torch.Tensor:
    """The pixel loss, plus `ssim_weight` x (1 - SSIM) when asked (on the unclamped output)."""
    pred, target = pred.float(), target.float()
    loss = SR_LOSSES[pixel](pred, target)
    if ssim_weight:
        from torchmetrics.functional.image import structural_similarity_index_measure   # see `sr_scores`
        loss = loss + ssim_weight * (1 - structural_similarity_index_measure(pred, target, data_range=1.0))
    return loss


def sr_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM (torchmetrics: data range 1, 11x11 Gaussian window, sigma 1.5) of predictions
    clamped to [0, 1], in float64."""
    # imported here: `import torchmetrics` loads all of its domains, text ones with transformers when installed
    # (peft brings it): seconds of CPU for every process that imports the models, most of which never score SR
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    pred, target = pred.detach().clamp(0, 1).double(), target.detach().double()
    return {"psnr": peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3)),
            "ssim": structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")}


def example_grid(high: torch.Tensor, low: torch.Tensor, sr: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, 5, H, W) rows of a figure: high resolution, low resolution (nearest-upsampled), bicubic, SR, |SR - HR|
    (first channel, SR clamped to [0, 1])."""
    sr = sr.detach().float().clamp(0, 1)
    columns = [high, F.interpolate(low, scale_factor=scale, mode="nearest"), bicubic_up(low, scale).clamp(0, 1), sr,
               (sr - high).abs()]
    return torch.stack([c[:, 0].float() for c in columns], 1)
