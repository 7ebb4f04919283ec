"""Noise matching (task `noisematch`): the classifier also learns the labelled images as they would look with the
target instrument's noise, measured on the target's own unlabelled images in the same batch.

Two instruments often differ most in depth (exposure time, sky background, read noise): the same lenses under more
noise. Each training step fits every image of the batch, labelled and target alike, a noise model (`noise_model`:
variance a + b x signal, the background's and the shot noise's, from the image's high-pass residual by medians,
so the lens's own structure stays out of it), gives each labelled image the model of a target image drawn at
random from the batch, adds Gaussian noise of the variance it lacks, pixel by pixel (none where the target is not
noisier: a target as clean as the labelled domain makes the task the classification loss again), renormalises the
view as the run's images are (`renormalize`: minmax and standardize are affine, so renormalising a normalised
image plus noise equals normalising the raw image plus noise scaled to its range) and adds the cross-entropy of
the run's classifier (task `classification`) on the views with the images' own labels. No target label is read:
only the target's pixels, through medians.

Every draw comes from a generator seeded by the batches seen so far (a checkpointed buffer), so a resumed run draws
the same views; the views' pass leaves the running statistics to the model's own pass (`running_stats_kept`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlscale.data.stream_config import NORMALIZATIONS
from dlscale.data.transforms import normalize
from dlscale.models.model import TARGET_DOMAIN
from dlscale.train.tasks.base import register_task
from dlscale.train.tasks.randomisation import LabelledViews

VIEW_SEED_KEY = 0x4E01
MAD_TO_SIGMA = 0.6745
"""The median absolute deviation of a standard normal variable (Phi^-1(3/4)): sigma = MAD / 0.6745."""
CHI2_1_MEDIAN = 0.4549
"""The median of a chi-square variable with one degree of freedom (the square of a standard normal one)."""
BRIGHT_SHARE = 0.1
"""The share of each image's pixels, the brightest, whose residuals measure the shot noise's gain."""
NOISE_MODELS = ("poisson_gaussian", "gaussian")


@dataclass
class NoiseMatchConfig:
    model: str = "poisson_gaussian"
    """the noise model fitted to each image: poisson_gaussian (variance a + b x signal: background and shot noise,
    a CCD's) or gaussian (variance a alone)"""
    renormalize: str = "minmax"
    """how a view is normalised again after its noise is added: the run's `data.normalize` (minmax, standardize,
    log or none)"""

    def __post_init__(self) -> None:
        if self.model not in NOISE_MODELS:
            raise ValueError(f"model.task_options.noisematch.model={self.model!r}: expected one of {NOISE_MODELS}")
        if self.renormalize not in NORMALIZATIONS:
            raise ValueError(f"model.task_options.noisematch.renormalize={self.renormalize!r}: expected one of "
                             f"{NORMALIZATIONS}")


def high_pass(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H-2, W-2): the images convolved with [1 -2 1]^T [1 -2 1] / 6 (L2 norm 1, so white
    noise keeps its sigma; planes vanish)."""
    b, c, h, w = images.shape
    if h < 3 or w < 3:
        raise ValueError(f"the noise estimate needs images of at least 3x3 pixels, got {h}x{w}")
    line = torch.tensor([1.0, -2.0, 1.0], dtype=images.dtype, device=images.device)
    kernel = (line[:, None] * line[None, :]) / line.square().sum()
    return F.conv2d(images.reshape(b * c, 1, h, w), kernel[None, None]).reshape(b, c, h - 2, w - 2)


def mad_sigma(residual: torch.Tensor) -> torch.Tensor:
    """(B, N) high-pass residuals, NaN where left out -> (B,): MAD / 0.6745 of each row's other values."""
    deviation = (residual - residual.nanmedian(1, keepdim=True).values).abs()
    return deviation.nanmedian(1).values / MAD_TO_SIGMA


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,): each image's white-noise standard deviation, MAD / 0.6745 of its high-pass residual
    (all channels together), robust to the signal where it is smooth or sparse."""
    return mad_sigma(high_pass(images).flatten(1))


def signal(images: torch.Tensor, valid: bool = False) -> torch.Tensor:
    """Each image's signal above its background (its median), averaged over 3x3 pixels (so a noisy image's own
    noise counts less) and clamped at 0: (B, C, H, W), or the (H-2, W-2) pixels `high_pass` keeps (`valid`)."""
    above = images - images.flatten(1).median(1).values[:, None, None, None]
    return F.avg_pool2d(above, 3, 1, padding=0 if valid else 1, count_include_pad=False).clamp_min(0)


def noise_model(images: torch.Tensor, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) (B,) each: each image's noise variance a + b x signal, the Poisson-Gaussian model of a CCD (Foi et
    al. 2008, "Practical Poissonian-Gaussian noise modeling and fitting for single-image raw-data"): a, the
    background's, the square of the MAD estimate over the half of the pixels with the least signal (`signal`; the
    shot noise of the lens's pixels left out); b, the shot noise's gain, the median over the brightest tenth of the
    pixels of (r^2 / 0.4549 - a) / signal, r the high-pass residual (0.4549: the median of a chi-square with one
    degree of freedom, so r^2 / 0.4549 has the median sigma^2 of Gaussian noise). A median, not a least-squares fit,
    so that a sharp lens's own curvature, large on a few pixels of its arcs, is not taken for shot noise: on
    noiseless images of a sharper PSF a fit of r^2 found a third of the bench's noise there. `gaussian`: a over
    every pixel (`noise_sigma`), b = 0."""
    if model == "gaussian":
        a = noise_sigma(images).square()
        return a, torch.zeros_like(a)
    s, residual = signal(images, valid=True).flatten(1), high_pass(images).flatten(1)
    background = torch.where(s <= s.median(1, keepdim=True).values, residual, torch.nan)
    a = mad_sigma(background).square()
    bright = (s >= s.quantile(1 - BRIGHT_SHARE, dim=1, keepdim=True)) & (s > 0)
    gain = torch.where(bright, (residual.square() / CHI2_1_MEDIAN - a[:, None]) / s, torch.nan)
    return a, gain.nanmedian(1).values.nan_to_num(0.0).clamp_min(0)


def noise_matched_views(images: torch.Tensor, target: torch.Tensor, model: str, renormalize: str,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(views, added noise variance (B, C, H, W)): each of `images` with Gaussian noise of the variance it lacks, pixel
    by pixel, to reach the noise model (`noise_model`) of a `target` image drawn at random (none where that image
    is not noisier), normalised again by `renormalize`. Draws come from `generator` on the CPU, so any device
    draws alike."""
    partner = torch.randint(len(target), (len(images),), generator=generator).to(target.device)
    a_t, b_t = (v[partner].to(images.device) for v in noise_model(target.float(), model))
    a_s, b_s = noise_model(images.float(), model)
    added = ((a_t - a_s)[:, None, None, None] + (b_t - b_s)[:, None, None, None] * signal(images.float()))
    added = added.clamp_min(0)
    noise = torch.randn(images.shape, generator=generator).to(images)
    return normalize(images + added.sqrt().to(images) * noise, renormalize), added


@register_task
class NoiseMatch(LabelledViews):
    """Cross-entropy of the run's classifier on the labelled images with the target's noise added."""
    name = "noisematch"
    Config = NoiseMatchConfig
    batch_keys = ("label", TARGET_DOMAIN)
    seed_key = VIEW_SEED_KEY

    def views(self, images, batch, generator):
        o = self.ctx.options or NoiseMatchConfig()
        return noise_matched_views(images, batch[TARGET_DOMAIN]["image"].detach(), o.model, o.renormalize,
                                   generator)[0]
