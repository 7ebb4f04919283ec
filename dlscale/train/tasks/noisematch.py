"""Noise matching (task `noisematch`): the classifier also learns the labelled images as they would look with the
target instrument's noise, measured on the target's own unlabelled images in the same batch.

Two instruments of one survey design often differ most in depth (exposure time, sky background): the same lens
under more noise. Each training step estimates every image's noise level with a robust estimator (Donoho &
Johnstone 1994: sigma = MAD / 0.6745 of a high-pass residual, here the image convolved with the 3x3 kernel
[1 -2 1]^T [1 -2 1], divided by its L2 norm, which leaves white noise's sigma unchanged and removes any plane; the
median keeps the lens's own structure out of it), gives each labelled image the level of a target image drawn at
random from the batch, adds Gaussian noise of the missing variance (sigma_target^2 - sigma_labelled^2; none where
the target is not noisier, so a target as clean as the labelled domain makes the task a no-op), renormalises the
view as the run's images are (`renormalize`: minmax and standardize are affine, so renormalising a normalised image
plus noise equals normalising the raw image plus noise scaled to its range) and adds the cross-entropy of the run's
classifier (task `classification`) on the views with the images' own labels. No target label is read: only the
target's pixels, through a median.

Every draw comes from a generator seeded by the batches seen so far (a checkpointed buffer), so a resumed run draws
the same views; the views' pass leaves the running statistics to the model's own pass (`running_stats_kept`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlscale.data.stream_config import NORMALIZATIONS
from dlscale.data.transforms import normalize
from dlscale.models.heads import global_pool
from dlscale.models.model import TARGET_DOMAIN, running_stats_kept
from dlscale.train.tasks.adaptation import require_classifier
from dlscale.train.tasks.base import Task, register_task
from dlscale.train.tasks.selftraining import ViewCounter

VIEW_SEED_KEY = 0x4E01
MAD_TO_SIGMA = 0.6745
"""The median absolute deviation of a standard normal variable (Phi^-1(3/4)): sigma = MAD / 0.6745."""


@dataclass
class NoiseMatchConfig:
    renormalize: str = "minmax"
    """how a view is normalised again after its noise is added: the run's `data.normalize` (minmax, standardize,
    log or none)"""

    def __post_init__(self) -> None:
        if self.renormalize not in NORMALIZATIONS:
            raise ValueError(f"model.task_options.noisematch.renormalize={self.renormalize!r}: expected one of "
                             f"{NORMALIZATIONS}")


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,): each image's white-noise standard deviation, MAD / 0.6745 of its high-pass residual
    (all channels together), robust to the signal where it is smooth or sparse."""
    b, c, h, w = images.shape
    if h < 3 or w < 3:
        raise ValueError(f"noise_sigma needs images of at least 3x3 pixels, got {h}x{w}")
    line = torch.tensor([1.0, -2.0, 1.0], dtype=images.dtype, device=images.device)
    kernel = (line[:, None] * line[None, :]) / line.square().sum()   # L2 norm 1: white noise keeps its sigma
    residual = F.conv2d(images.reshape(b * c, 1, h, w), kernel[None, None]).reshape(b, -1)
    deviation = (residual - residual.median(1, keepdim=True).values).abs()
    return deviation.median(1).values / MAD_TO_SIGMA


def noise_matched_views(images: torch.Tensor, target: torch.Tensor, renormalize: str,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(views, added sigma (B,)): each of `images` with Gaussian noise of the variance it lacks to reach the noise
    of a `target` image drawn at random (none where that image is not noisier), normalised again by
    `renormalize`. Draws come from `generator` on the CPU, so any device draws alike."""
    partner = torch.randint(len(target), (len(images),), generator=generator)
    wanted = noise_sigma(target.float())[partner.to(target.device)].to(images.device)
    added = (wanted.square() - noise_sigma(images.float()).square()).clamp_min(0).sqrt()
    noise = torch.randn(images.shape, generator=generator).to(images)
    views = images + added.to(images)[:, None, None, None] * noise
    return normalize(views, renormalize), added


@register_task
class NoiseMatch(Task):
    """Cross-entropy of the run's classifier on the labelled images with the target's noise level added."""
    name = "noisematch"
    Config = NoiseMatchConfig
    batch_keys = ("label", TARGET_DOMAIN)

    def build_head(self) -> nn.Module:
        return ViewCounter()

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: no views
            return {}
        classifier = require_classifier(model, self.name)
        _, seed = head.next_seed(VIEW_SEED_KEY)
        views, added = noise_matched_views(images.detach(), batch[TARGET_DOMAIN]["image"].detach(),
                                           (self.ctx.options or NoiseMatchConfig()).renormalize,
                                           torch.Generator().manual_seed(seed))
        with running_stats_kept(model):
            return {"noisematch_logits": classifier(global_pool(model.encoder(views))), "noisematch_sigma": added}

    def loss(self, out, images, batch):
        logits = out["noisematch_logits"].float()
        return F.cross_entropy(logits, batch["label"].to(logits.device))
