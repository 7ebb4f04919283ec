"""Instrument randomisation of the labelled images (task `instrument`): the classifier also learns the labelled
images as other instruments would have taken them, so that its features depend less on one instrument's pixel
scale, PSF, noise and flux calibration (domain randomisation, Tobin et al. 2017, "Domain randomization for
transferring deep neural networks from simulation to the real world").

Each view (`instrument_view`) changes what differs between telescopes and leaves the lens alone: the pixel scale
(a zoom about the image centre by a factor log-uniform in [1 / max_zoom, max_zoom], bilinear), the PSF (an extra
Gaussian blur of sigma uniform in [0, max_blur] pixels), the flux calibration (a factor in [1 - flux_scale,
1 + flux_scale]) and the noise (Gaussian, standard deviation uniform in [0, noise]); the loss is the cross-entropy
of the run's classifier (task `classification`) on the views with the images' own labels. It needs no target
images, so it serves any stage that classifies; in stage adapt it combines with AdaBN (`data.target.adabn`) and
the target tasks. The ranges are generic (a survey's pixel scale and PSF differ from another's by tens of percent),
not fitted to any one pair of instruments.

Every draw comes from a generator seeded by the batches seen so far (a checkpointed buffer), so a resumed run draws
the same views. The views' pass leaves the running statistics to the model's own pass (`running_stats_kept`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dlscale.models.heads import global_pool
from dlscale.models.model import running_stats_kept
from dlscale.train.tasks.adaptation import require_classifier
from dlscale.train.tasks.base import Task, register_task
from dlscale.train.tasks.selftraining import ViewCounter

VIEW_SEED_KEY = 0x1257


@dataclass
class InstrumentViewConfig:
    max_zoom: float = 1.4
    """pixel scale: a zoom about the centre by a factor log-uniform in [1 / max_zoom, max_zoom] (1: none)"""
    max_blur: float = 1.5
    """PSF: an extra Gaussian blur of sigma uniform in [0, max_blur] pixels (0: none)"""
    flux_scale: float = 0.2
    """flux calibration: the image multiplied by a factor in [1 - flux_scale, 1 + flux_scale]"""
    noise: float = 0.05
    """Gaussian noise of standard deviation uniform in [0, noise] (images are normalised, about unit range)"""

    def __post_init__(self) -> None:
        if self.max_zoom < 1 or self.max_blur < 0 or not 0 <= self.flux_scale < 1 or self.noise < 0:
            raise ValueError(f"model.task_options.instrument: expected max_zoom >= 1, max_blur >= 0, "
                             f"0 <= flux_scale < 1, noise >= 0 (got {self.max_zoom}, {self.max_blur}, "
                             f"{self.flux_scale}, {self.noise})")


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, H, W) images, each blurred by a separable Gaussian of its own `sigma` (B,) pixels, kernel radius
    `radius` (sigma 0: unchanged); reflected at the edges."""
    b, c, h, w = images.shape
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-x.square() / (2 * sigma.to(images).clamp_min(1e-3)[:, None].square()))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)   # (B*C, 2r+1)
    flat = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def instrument_view(images: torch.Tensor, o: InstrumentViewConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> the images as another instrument might have taken them (zoom, blur, flux scale, noise, each
    drawn per image from `generator` on the CPU, so any device draws alike)."""
    b = len(images)
    zoom = torch.exp(math.log(o.max_zoom) * (2 * torch.rand(b, generator=generator) - 1))
    sigma = o.max_blur * torch.rand(b, generator=generator)
    scale = 1 + o.flux_scale * (2 * torch.rand(b, generator=generator) - 1)
    noise_sigma = o.noise * torch.rand(b, generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom   # output pixel at x samples the input at x / zoom: zoom > 1 magnifies
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if o.max_blur > 0:
        views = gaussian_blur(views, sigma.to(images.device), math.ceil(3 * o.max_blur))
    return views * scale.to(images)[:, None, None, None] + (noise_sigma[:, None, None, None] * noise).to(images)


class LabelledViews(Task):
    """Cross-entropy of the run's classifier on views of the labelled images, with their own labels; a subclass
    sets `name`, `seed_key` and `views`. The views' pass leaves the running statistics to the model's own."""
    batch_keys: ClassVar[tuple[str, ...]] = ("label",)
    seed_key: ClassVar[int] = 0
    """Salt of the views' seed (one per task, so two such tasks of one run draw independently)."""

    def build_head(self) -> nn.Module:
        return ViewCounter()

    def views(self, images: torch.Tensor, batch: dict, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: no views
            return {}
        classifier = require_classifier(model, self.name)
        _, seed = head.next_seed(self.seed_key)
        views = self.views(images.detach(), batch, torch.Generator().manual_seed(seed))
        with running_stats_kept(model):
            return {f"{self.name}_logits": classifier(global_pool(model.encoder(views)))}

    def loss(self, out, images, batch):
        logits = out[f"{self.name}_logits"].float()
        return F.cross_entropy(logits, batch["label"].to(logits.device))


@register_task
class InstrumentViews(LabelledViews):
    """Cross-entropy of the run's classifier on instrument-randomised views of the labelled images."""
    name = "instrument"
    Config = InstrumentViewConfig
    seed_key = VIEW_SEED_KEY

    def views(self, images, batch, generator):
        return instrument_view(images, self.ctx.options or InstrumentViewConfig(), generator)
