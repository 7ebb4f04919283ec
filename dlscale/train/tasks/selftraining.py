"""Self-training on the unlabelled target domain (task `selftrain`, stage adapt), in the manner of AdaMatch
(Berthelot et al. 2022, "AdaMatch: a unified approach to semi-supervised learning and domain adaptation"), itself
FixMatch's (Sohn et al. 2020) pseudo-labelling:

- the weak view is the target image as the stream gives it (dihedral flips and rotations); its class probabilities,
  from the run's own classifier (task `classification`) and without gradient, are the pseudo-label's source;
- distribution alignment: those probabilities are multiplied by the ratio of the labelled batch's mean prediction
  to the target batch's, and renormalised (the target's class balance is taken to be the labelled data's);
- relative confidence threshold: a pseudo-label counts when its aligned confidence reaches `threshold` times the
  labelled batch's mean confidence (a fixed 0.95 would admit nothing while the domains are far apart);
- the strong view adds what an instrument changes and a lens does not care about (`strong_view`): a shift of a few
  pixels, a flux scale, Gaussian noise, over another dihedral element; the classifier is trained with
  cross-entropy to give the strong view the weak view's pseudo-label (averaged over the whole target batch);
- the loss's weight ramps up with AdaMatch's schedule, 0.5 - cos(min(pi, 2 pi p)) / 2 over training progress p.

Every random draw comes from a generator seeded by the batches seen so far (a checkpointed buffer), so a resumed
run draws the same views. This task's passes leave the running statistics as the model's own pass set them
(`running_stats_kept`). Target labels are never read: the batch does not carry them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlscale.data.transforms import augment
from dlscale.models.heads import global_pool
from dlscale.models.model import TARGET_DOMAIN, running_stats_kept
from dlscale.train.tasks.adaptation import require_classifier, target_features
from dlscale.train.tasks.base import Task, register_task

VIEW_SEED_KEY = 0x5E1F7


@dataclass
class SelfTrainConfig:
    threshold: float = 0.9
    """a pseudo-label counts when its confidence is >= threshold x the labelled batch's mean confidence"""
    align: bool = True
    """distribution alignment of the target's predictions to the labelled batch's"""
    max_shift: int = 4
    """strong view: a shift of up to this many pixels along each axis (image wrapped around)"""
    flux_scale: float = 0.2
    """strong view: the image multiplied by a factor in [1 - flux_scale, 1 + flux_scale]"""
    noise: float = 0.05
    """strong view: Gaussian noise of standard deviation up to this (images are normalised, about unit range)"""
    ramp: bool = True
    """AdaMatch's ramp of the loss's weight over training (0 at the start, 1 from half-way)"""

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1 or self.max_shift < 0 or not 0 <= self.flux_scale < 1 or self.noise < 0:
            raise ValueError(f"model.task_options.selftrain: expected 0 < threshold <= 1, max_shift >= 0, "
                             f"0 <= flux_scale < 1, noise >= 0 (got {self.threshold}, {self.max_shift}, "
                             f"{self.flux_scale}, {self.noise})")


def strong_view(images: torch.Tensor, o: SelfTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> a strongly augmented copy: a random dihedral element, a shift of up to `max_shift` pixels,
    a flux scale and Gaussian noise, each drawn per image from `generator` (on the CPU, so any device draws alike)."""
    b = len(images)
    views = augment(images.clone(), generator)
    shifts = torch.randint(-o.max_shift, o.max_shift + 1, (b, 2), generator=generator)
    scale = 1 + o.flux_scale * (2 * torch.rand(b, generator=generator) - 1)
    sigma = o.noise * torch.rand(b, generator=generator)
    noise = torch.randn(views.shape, generator=generator)
    views = torch.stack([torch.roll(v, tuple(s.tolist()), dims=(-2, -1)) for v, s in zip(views, shifts)])
    return views * scale[:, None, None, None].to(views) + (sigma[:, None, None, None] * noise).to(views)


def pseudo_labels(source_probs: torch.Tensor, target_probs: torch.Tensor, threshold: float, align: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, mask) of the target batch: AdaMatch's distribution alignment (optional) and relative threshold."""
    if align:
        target_probs = target_probs * (source_probs.mean(0) / target_probs.mean(0).clamp_min(1e-6))
        target_probs = target_probs / target_probs.sum(1, keepdim=True)
    confidence, labels = target_probs.max(1)
    return labels, confidence >= threshold * source_probs.max(1).values.mean()


def adamatch_ramp(progress: float) -> float:
    """0.5 - cos(min(pi, 2 pi p)) / 2: 0 at p = 0, 1 from p = 1/2 on."""
    return 0.5 - math.cos(min(math.pi, 2 * math.pi * progress)) / 2


class ViewCounter(nn.Module):
    """The count of training batches seen: seeds the views and sets the ramp (checkpointed)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.int64))

    def next_seed(self, key: int) -> tuple[int, int]:
        """(batches seen before this one, the seed of this batch's views under `key`); counts the batch in training
        (one host read per step)."""
        seen = int(self.batches_seen)
        if self.training:
            self.batches_seen += 1
        return seen, int(np.random.SeedSequence([seen, key]).generate_state(1)[0])


@register_task
class SelfTrain(Task):
    """AdaMatch-style pseudo-labels on the target (needs task `classification` in the same run)."""
    name = "selftrain"
    Config = SelfTrainConfig
    batch_keys = (TARGET_DOMAIN,)

    def build_head(self) -> nn.Module:
        return ViewCounter()

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: nothing to adapt
            return {}
        classifier = require_classifier(model, self.name)
        o = self.ctx.options or SelfTrainConfig()
        seen, seed = head.next_seed(VIEW_SEED_KEY)
        with torch.no_grad(), running_stats_kept(classifier):
            source_probs = torch.softmax(classifier(global_pool(feature_map)).float(), 1)
            target_probs = torch.softmax(classifier(target_features(batch)).float(), 1)
        labels, mask = pseudo_labels(source_probs, target_probs, o.threshold, o.align)
        strong = strong_view(batch[TARGET_DOMAIN]["image"].cpu(), o, torch.Generator().manual_seed(seed))
        with running_stats_kept(model):   # target views: the running statistics stay the labelled domain's
            logits = classifier(global_pool(model.encoder(strong.to(images.device, images.dtype))))
        ramp = adamatch_ramp(seen / self.ctx.total_steps) if o.ramp and self.ctx.total_steps else 1.0
        return {"selftrain_logits": logits, "selftrain_labels": labels, "selftrain_mask": mask,
                "selftrain_ramp": torch.tensor(ramp, device=logits.device)}

    def loss(self, out, images, batch):
        ce = F.cross_entropy(out["selftrain_logits"].float(), out["selftrain_labels"], reduction="none")
        return out["selftrain_ramp"] * (ce * out["selftrain_mask"]).mean()
