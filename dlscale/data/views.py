"""Random views of lensing images for contrastive / self-distillation pre-training.

A view keeps the physics the encoder must learn: the dihedral group (lenses have no preferred orientation),
shifts of a few pixels with reflected borders (a lens is not exactly centred), a Gaussian PSF-like blur (seeing),
noise at each image's own noise level, flux scaling about the background. No colour jitter (the channels are
bands or one band, not colours) and no rescaling crops: zooming changes the apparent Einstein radius, a quantity
the representation must keep.

Works on a normalised (B, C, H, W) batch on any device, drawing every random number from a torch.Generator on
that device: per-sample parameters are tensors, so nothing waits on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class ViewConfig:
    """Strengths of the random view transforms (each 0 / False switches one off)."""

    dihedral: bool = True
    """Random flips and, for square images, 90-degree rotations: one of the 8 symmetries of the square."""
    max_shift: int = 4
    """Largest shift in pixels along each axis; the uncovered border is filled by reflection."""
    blur_prob: float = 0.5
    """Probability that a view is blurred by a Gaussian PSF."""
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    """Range of the PSF's standard deviation in pixels (drawn uniformly)."""
    noise_level: float = 0.5
    """Largest added Gaussian noise, as a multiple of each image's robust noise estimate (1.4826 x the median
    absolute deviation: the background's scatter in images that are mostly sky); drawn uniformly in [0, level]."""
    flux_scale: float = 1.2
    """Flux is scaled about each image's median (its background) by a factor drawn log-uniformly in
    [1 / flux_scale, flux_scale]; 1 switches it off."""

    def __post_init__(self) -> None:
        lo, hi = self.blur_sigma
        problems = [message for bad, message in (
            (self.max_shift < 0, f"max_shift must be >= 0, got {self.max_shift}"),
            (not 0.0 <= self.blur_prob <= 1.0, f"blur_prob must be in [0, 1], got {self.blur_prob}"),
            (not 0.0 < lo <= hi, f"blur_sigma must be a range 0 < low <= high, got {self.blur_sigma}"),
            (self.noise_level < 0, f"noise_level must be >= 0, got {self.noise_level}"),
            (self.flux_scale < 1, f"flux_scale must be >= 1, got {self.flux_scale}"),
        ) if bad]
        if problems:
            raise ValueError("ViewConfig: " + "; ".join(problems))


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _per_sample(condition: torch.Tensor) -> torch.Tensor:
    return condition.view(-1, 1, 1, 1)


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image gets a random element of the dihedral group (D4 for square images, flips only otherwise)."""
    flips = torch.rand(3, x.shape[0], generator=generator, device=x.device) < 0.5
    x = torch.where(_per_sample(flips[0]), x.flip(-1), x)
    x = torch.where(_per_sample(flips[1]), x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(_per_sample(flips[2]), x.transpose(-1, -2), x)
    return x


def shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels along each axis, refilling the border by reflection."""
    b, c, height, width = x.shape
    s = min(max_shift, height - 1, width - 1)
    if s == 0:
        return x
    offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator, device=x.device)
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    rows = (offsets[0, :, None] + torch.arange(height, device=x.device)).view(b, 1, height, 1)
    cols = (offsets[1, :, None] + torch.arange(width, device=x.device)).view(b, 1, 1, width)
    picked_rows = padded.gather(2, rows.expand(b, c, height, width + 2 * s))
    return picked_rows.gather(3, cols.expand(b, c, height, width))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur image i by a Gaussian of standard deviation `sigma[i]` <= `max_sigma` pixels (separable, reflected
    borders, kernel radius 3 max_sigma); a sigma near 0 leaves the image unchanged."""
    b, c, height, width = x.shape
    radius = max(1, min(math.ceil(3 * max_sigma), (min(height, width) - 1) // 2))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)     # (B C, taps)
    out = F.pad(x.reshape(1, b * c, height, width), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(b * c, 1, -1, 1), groups=b * c)
    out = F.conv2d(out, kernel.view(b * c, 1, 1, -1), groups=b * c)
    return out.view(b, c, height, width)


def robust_std(x: torch.Tensor) -> torch.Tensor:
    """Per-image noise estimate (B, 1, 1, 1): 1.4826 x the median absolute deviation over all pixels and channels
    (the standard deviation for Gaussian noise, and barely moved by the bright lens and arcs)."""
    flat = x.flatten(1)
    median = flat.median(dim=1, keepdim=True).values
    return 1.4826 * (flat - median).abs().median(dim=1).values.view(-1, 1, 1, 1)


def random_view(images: torch.Tensor, cfg: ViewConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image: dihedral, shift, blur, flux scaling, noise (noise last, at the level of the
    input image, so it is not smoothed away by the blur)."""
    if images.dim() != 4:
        raise ValueError(f"views take a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if generator.device != images.device:
        raise ValueError(f"the generator is on {generator.device}, the images on {images.device}: "
                         "create the generator on the images' device")
    dtype, device, b = images.dtype, images.device, images.shape[0]
    x = images.float()
    noise_std = robust_std(x) if cfg.noise_level > 0 else None
    if cfg.dihedral:
        x = dihedral(x, generator)
    if cfg.max_shift > 0:
        x = shift(x, cfg.max_shift, generator)
    if cfg.blur_prob > 0:
        blurred = torch.rand(b, generator=generator, device=device) < cfg.blur_prob
        sigma = _uniform(b, *cfg.blur_sigma, generator, device)
        x = gaussian_blur(x, torch.where(blurred, sigma, torch.zeros_like(sigma)), cfg.blur_sigma[1])
    if cfg.flux_scale > 1:
        log_scale = math.log(cfg.flux_scale)
        factor = _uniform(b, -log_scale, log_scale, generator, device).exp().view(-1, 1, 1, 1)
        background = x.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
        x = background + factor * (x - background)
    if noise_std is not None:
        level = _uniform(b, 0.0, cfg.noise_level, generator, device).view(-1, 1, 1, 1)
        x = x + level * noise_std * torch.randn(x.shape, generator=generator, device=device)
    return x.to(dtype)


def two_views(images: torch.Tensor, cfg: ViewConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random views of the same images (the positive pairs of contrastive learning)."""
    return random_view(images, cfg, generator), random_view(images, cfg, generator)
