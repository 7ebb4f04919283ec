"""The `contrastive` task: SimCLR (NT-Xent, negatives from every rank) or BYOL (EMA target, no negatives) on two
random lensing views of each image (options: `model.task_options.contrastive`, the fields of
`ContrastiveConfig`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dlscale.data.views import ViewConfig, two_views
from dlscale.models.contrastive import BYOLHead, ProjectionHead, byol_tau, nt_xent
from dlscale.train.tasks.base import Task, register_task
from dlscale.train.tasks.randomness import SeededDraws, seeded_generator, step_draw

METHODS = ("simclr", "byol")


@dataclass
class ContrastiveConfig:
    """Method, heads and views of contrastive pre-training."""

    method: str = "simclr"
    """simclr (NT-Xent; needs a few negatives: the batch of every rank counts) | byol (works at any batch)."""
    temperature: float = 0.2
    """simclr: softmax temperature of the cosine similarities."""
    hidden_dim: int = 512
    """Hidden width of the projector (and BYOL's predictor)."""
    projection_dim: int = 128
    """Dimension of the compared embeddings."""
    norm: str = "layer"
    """Norm inside projector / predictor: layer (independent of the batch) | batch | none."""
    tau: float = 0.996
    """byol: EMA momentum of the target network (per training forward, micro-batches included)."""
    tau_schedule_steps: int = 0
    """byol: > 0 raises tau to 1 on a cosine over this many training forwards (BYOL's schedule); 0 keeps it."""
    views: ViewConfig = field(default_factory=ViewConfig)
    """Strengths of the random views (dlscale.data.views.ViewConfig)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"model.task_options.contrastive.method={self.method!r}: expected one of "
                             f"{', '.join(METHODS)}")
        if self.temperature <= 0 or not 0.0 <= self.tau <= 1.0 or self.tau_schedule_steps < 0:
            raise ValueError(f"model.task_options.contrastive: temperature must be > 0 (got {self.temperature}), "
                             f"tau in [0, 1] (got {self.tau}), tau_schedule_steps >= 0 (got "
                             f"{self.tau_schedule_steps})")


class SimCLRTaskHead(SeededDraws, nn.Module):
    """SimCLR's projector, with the task's reproducible per-step view generators."""

    def __init__(self, in_dim: int, cfg: ContrastiveConfig) -> None:
        super().__init__()
        self.projector = ProjectionHead(in_dim, cfg.hidden_dim, cfg.projection_dim, cfg.norm)


class BYOLTaskHead(SeededDraws, BYOLHead):
    """`BYOLHead` with the task's reproducible per-step view generators."""


@register_task
class Contrastive(Task):
    """Agreement between two views of each image: the loss is computed in `forward` (it needs both views'
    embeddings, and SimCLR gathers the other ranks')."""
    name = "contrastive"
    Config = ContrastiveConfig
    uses_feature_map = False     # the encoder runs on the views, inside this task
    seed_salt: int = 2
    """Salt of the head's view draws: each contrastive task of one model draws its own views."""

    def build_head(self) -> nn.Module:
        cfg = self.cfg = self.ctx.options or ContrastiveConfig()
        if cfg.method == "simclr":
            head = SimCLRTaskHead(self.ctx.encoder_channels, cfg)
        elif self.ctx.encoder is None:
            raise ValueError(f"task {self.name!r} with method byol needs the encoder in its TaskContext (its target "
                             "network starts as a copy)")
        else:
            head = BYOLTaskHead(self.ctx.encoder, cfg.hidden_dim, cfg.projection_dim, cfg.norm)
        head.seed_salt = self.seed_salt
        return head

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:          # evaluation / inference: the linear probe on clean features judges this task
            return {}
        cfg = self.cfg
        step, replay = step_draw(head, batch, self.name)
        view1, view2 = two_views(images, cfg.views, seeded_generator(images.device, head.seed_salt, step))
        if cfg.method == "simclr":
            z1, z2 = head.projector(model.encoder(torch.cat([view1, view2]))).chunk(2)
            return {f"{self.name}_loss": nt_xent(z1, z2, cfg.temperature)}
        # The target follows the weights the last optimiser step left, once per step (not again when the step's
        # batch is replayed); the first step starts it as their copy (the encoder may have been initialised from
        # a file after the head was built).
        if not replay:
            tau = 0.0 if step == 0 else (byol_tau(step, cfg.tau_schedule_steps, cfg.tau) if cfg.tau_schedule_steps
                                         else cfg.tau)
            head.update_target(model.encoder, tau)
        return {f"{self.name}_loss": head(model.encoder, view1, view2)}

    def loss(self, out, images, batch):
        return out[f"{self.name}_loss"]
