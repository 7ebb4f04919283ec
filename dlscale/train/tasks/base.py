"""What a task is: one training objective on the shared encoder, self-contained so that a new objective is one file.

A task owns its head (built from the run's `TaskContext`), the model outputs it produces, its loss, the batch
entries that loss reads, and what evaluation collects from it. The model (`dlscale.models.TaskModel`) runs the
encoder once and hands the feature map to every task; the engine sums the task losses through the loss weighting
and never names a task.

    @register_task
    class Denoise(Task):
        name = "denoise"
        def build_head(self): return Decoder(self.ctx.encoder_channels, self.ctx.image_shape,
                                             self.ctx.encoder_downsample)
        def forward(self, head, feature_map, images, batch, model): return {"denoised": head(feature_map)}
        def loss(self, out, images, batch): return F.mse_loss(out["denoised"], batch["clean"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dlscale.configtree import from_dict
from dlscale.registry import Registry


@dataclass(frozen=True)
class TaskContext:
    """What heads and losses need to know about the run: data, encoder and the task's own options."""
    image_shape: tuple[int, int, int]
    encoder_channels: int
    encoder_downsample: int
    n_classes: int = 3
    targets: tuple[str, ...] = ()             # regression target names (metadata keys)
    target_stats: dict | None = None          # {"mean": [...], "std": [...]} of the targets on the train split
    classifier_dropout: float = 0.0
    options: Any = None                       # an instance of the task's `Config` (model.task_options.<task>)
    encoder: nn.Module | None = field(default=None, compare=False, repr=False)
    total_steps: int = 0                      # training batches of the whole run (0: unknown, e.g. at evaluation)


class Task:
    """Base class of a registered task (see the module docstring for a whole example)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    """Dataclass of the task's options, set as `model.task_options.<name>.<field>` (None: no options)."""
    batch_keys: ClassVar[tuple[str, ...]] = ()
    """Batch entries the loss reads besides `image` (e.g. `label`, `target`); a stream lacking one is refused."""
    uses_feature_map: ClassVar[bool] = True
    """False for tasks that run the encoder on inputs of their own (masked images, views): the clean image's
    feature map is then only computed when another task or evaluation needs it."""

    output_images: ClassVar[str] = ""
    """Name of the images the task makes from an input at prediction time (`dlscale predict` writes
    OUT/<name>.npy); empty: none. Such a task takes inputs of `input_shape` and implements `make_images`."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx

    def input_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (C, H, W) of the inputs `make_images` takes (default: the run's images)."""
        return tuple(image_shape)

    def make_images(self, head: nn.Module, images: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """The images the task makes from `images` (normalised as the run's data) at prediction time."""
        raise NotImplementedError(f"task {self.name!r} makes no images")

    def build_head(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, head: nn.Module, feature_map: torch.Tensor | None, images: torch.Tensor,
                batch: dict | None, model: nn.Module) -> dict[str, torch.Tensor]:
        """Model outputs of this task. `batch` is None at inference/evaluation time (images only)."""
        raise NotImplementedError

    def loss(self, out: dict[str, torch.Tensor], images: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def collect(self, out: dict[str, torch.Tensor], images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample arrays evaluation gathers from this task's outputs (default: nothing)."""
        return {}

    def examples(self, out: dict[str, torch.Tensor], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """A few images evaluation shows in TensorBoard (default: none)."""
        return {}

    def initializes(self) -> bool:
        """Whether `initialize` fits the head before the first step (it then needs the probe's train features)."""
        return False

    def initialize(self, head: nn.Module, train: dict[str, np.ndarray]) -> dict[str, float]:
        """Before the first step: fit the new head to the eval-mode outputs of training images (`train` as in
        `finalize`); returns metrics to record (default: the head keeps its random initialisation)."""
        return {}

    def finalizes(self) -> bool:
        """Whether `finalize` needs train features in a run without a probe (`eval.probe_samples=0`): the whole
        train split's are then gathered for it (default: no; the probe's train set, when there is one, is always
        handed to `finalize`)."""
        return False

    def finalize(self, head: nn.Module, train: dict[str, np.ndarray]) -> dict[str, float]:
        """After the last step: adjust the trained head to the eval-mode outputs of training images (`train`: the
        gathered `features`, `labels`, ... of the probe's train set, the same on every rank); returns metrics to
        record (default: nothing to adjust)."""
        return {}

    @classmethod
    def available(cls, n_targets: int) -> bool:
        """Whether the task can train on this data (regression needs targets)."""
        return True


TASKS: Registry[Task] = Registry("task")
"""Registered tasks by name, in registration order: the order losses are reported in."""
register_task = TASKS.register
"""Class decorator adding a task to the registry (a test or a user's launch script may add its own)."""
task_class = TASKS.get_class


def task_options(name: str, values: dict | None) -> Any:
    """The typed options of task `name` from `model.task_options.<name>` (a mapping, or already an instance of the
    task's `Config`, as a loaded config holds them; unknown keys raise naming them)."""
    cls = task_class(name)
    if cls.Config is not None and isinstance(values, cls.Config):
        return values
    if cls.Config is None:
        if values:
            raise ValueError(f"model.task_options.{name}: task {name!r} has no options, got {sorted(values)}")
        return None
    return from_dict(cls.Config, dict(values or {}), f"model.task_options.{name}.")
