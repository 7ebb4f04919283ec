"""The model every stage trains: one shared encoder plus an `nn.ModuleDict` of task heads (and the loss weighting).

It knows nothing about particular tasks: each registered task (`dlscale.train.tasks`) builds its head and turns
the encoder's feature map into its outputs. Keeping the weighting inside the model means its learned parameters
(uncertainty log-variances) and state (DWA history, FAMO logits) are trained, sharded and checkpointed by the same
DeepSpeed engine as the network.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from dlscale.models.heads import global_pool

TARGET_DOMAIN = "target_domain"
"""Batch key of a second domain's images (domain adaptation): a dict with `image` (B', C, H, W) and `ids`."""
TARGET_FEATURES = "target_features"
"""Key under which the tasks' batch gets the pooled features (B', C) of TARGET_DOMAIN's images."""
TARGET_MAP = "target_feature_map"
"""Key under which the tasks' batch gets the encoder's feature map (B', C, h, w) of TARGET_DOMAIN's images."""


@contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Inside: `module`'s BatchNorms still normalise a training batch by its own statistics, but leave their running
    statistics as they are (momentum 0: running = 1 x running + 0 x batch, exactly). For a second domain's passes,
    so that the running statistics, and the run's model with them, stay the labelled domain's."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


class TaskModel(nn.Module):
    """`forward(images, batch=None)` returns a dict: `features` (pooled encoder features (B, C), whenever the clean
    image's feature map was computed) plus every task's outputs (`recon`, `logits`, `regression`, ...).
    `batch` is the training batch (labels, views, ...) or None at evaluation and inference time.

    A batch carrying a second domain's images (TARGET_DOMAIN) is encoded in the same encoder pass as `images`, so
    BatchNorm normalises both domains with the same statistics in training, as its running statistics will at
    evaluation; with `separate_domains` each domain passes alone (normalised with its own batch statistics, as
    AdaBN's target statistics will at inference), and the target's pass leaves the running statistics to the
    labelled domain (`running_stats_kept`): the run's model is the labelled domain's, AdaBN makes the target's.
    The tasks see the second domain's pooled features as `batch[TARGET_FEATURES]`, its feature map as
    `batch[TARGET_MAP]`."""
    separate_domains: bool = False

    def __init__(self, encoder: nn.Module, tasks: Mapping[str, object], weighting: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.task_specs = dict(tasks)
        self.heads = nn.ModuleDict({name: task.build_head() for name, task in self.task_specs.items()})
        self.weighting = weighting

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names, in the order losses are reported."""
        return tuple(self.task_specs)

    def forward(self, images: torch.Tensor, batch: dict | None = None) -> dict[str, torch.Tensor]:
        need_map = batch is None or any(task.uses_feature_map for task in self.task_specs.values())
        feature_map = None
        if need_map and batch is not None and TARGET_DOMAIN in batch:
            target = batch[TARGET_DOMAIN]["image"]
            if self.separate_domains:
                feature_map = self.encoder(images)
                with running_stats_kept(self.encoder):
                    target_map = self.encoder(target)
            else:
                joint = self.encoder(torch.cat([images, target]))
                feature_map, target_map = joint[:len(images)], joint[len(images):]
            batch = {**batch, TARGET_FEATURES: global_pool(target_map), TARGET_MAP: target_map}
        elif need_map:
            feature_map = self.encoder(images)
        out = {} if feature_map is None else {"features": global_pool(feature_map)}
        for name, task in self.task_specs.items():
            out.update(task.forward(self.heads[name], feature_map, images, batch, self))
        return out

    def losses(self, out: dict[str, torch.Tensor], images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Each task's unweighted loss."""
        return {name: task.loss(out, images, batch) for name, task in self.task_specs.items()}

    def collect(self, out: dict[str, torch.Tensor], images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample arrays an evaluation keeps from this forward: every task's (`Task.collect`)."""
        rows: dict[str, torch.Tensor] = {}
        for task in self.task_specs.values():
            rows.update(task.collect(out, images, batch))
        return rows

    def examples(self, out: dict[str, torch.Tensor], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The images an evaluation shows (inputs and reconstructions, ...): every task's (`Task.examples`)."""
        shown: dict[str, torch.Tensor] = {}
        for task in self.task_specs.values():
            shown.update(task.examples(out, images))
        return shown

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (B, C), without running the heads: the input of linear probes."""
        return global_pool(self.encoder(x))
