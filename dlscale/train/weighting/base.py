"""The loss-weighting interface and its registry.

A weighting is an `nn.Module` inside the model (`TaskModel.weighting`), so learned weights are trained by the
engine's optimizer and any state travels in the engine's checkpoints. The engine calls three hooks and never
branches on the method:

- `forward(losses)`: `{task: scalar loss}` -> `(total, {task: effective weight})`, a weight as a float or a 0-dim
  tensor: the trainer reads them to the host only at its logging interval, so a step never waits on the device;
- `end_epoch(mean_losses)`: once per epoch on every rank, with each task's epoch-mean loss all-reduced across
  ranks (DWA's rule);
- `backward(engine, losses, total, images, batch)`: back-propagate; the default is `engine.backward(total)`.
  Gradient-based methods override it (they may take per-task gradients of `engine.module`'s encoder first, on a
  forward of their own of `images` / `batch`).

Each method has a typed options dataclass `Config`, set as `loss.<method>.<field>` (built-in methods) or
`loss.options.<method>.<field>` (methods registered outside dlscale).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from dlscale.configtree import from_dict
from dlscale.registry import Registry


class LossWeighting(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None

    def __init__(self, tasks: Sequence[str], options: Any = None) -> None:
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"loss weighting needs distinct task names, got {list(tasks)}")
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.options = options

    @property
    def weights(self) -> dict[str, float]:
        """The effective weights now (logged as `train/weight_<task>`)."""
        return {task: 1.0 for task in self.tasks}

    def check_tasks(self, values: Mapping[str, Any], what: str = "losses") -> None:
        """Raise naming the missing and unexpected tasks unless `values` has exactly this weighting's tasks."""
        missing = sorted(set(self.tasks) - set(values))
        unexpected = sorted(set(values) - set(self.tasks))
        if missing or unexpected:
            raise ValueError(f"{what} must have tasks {list(self.tasks)}: missing {missing}, unexpected {unexpected}")

    def weighted_sum(self, losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """sum_t w_t * L_t for weights that are plain numbers."""
        self.check_tasks(losses)
        return sum(weights[task] * losses[task] for task in self.tasks), dict(weights)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        return self.weighted_sum(losses, self.weights)

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """Epoch-end hook (all-reduced per-task means); nothing by default."""

    def backward(self, engine, losses: Mapping[str, torch.Tensor], total: torch.Tensor, images: torch.Tensor,
                 batch: dict) -> None:
        """Back-propagation hook; gradient-based methods replace it."""
        engine.backward(total)


WEIGHTINGS: Registry[LossWeighting] = Registry("loss weighting")
register_weighting = WEIGHTINGS.register
"""Class decorator adding a weighting to the registry (a test or a user's launch script may add its own)."""
weighting_class = WEIGHTINGS.get_class


def build_weighting(method: str, tasks: Sequence[str], options: Any = None, **fields: Any) -> LossWeighting:
    """The weighting `method` for `tasks`. `options` is the method's `Config` (or a dict of its fields);
    keyword `fields` set single options, e.g. `build_weighting("fixed", tasks, weights={...})`."""
    cls = weighting_class(method)
    if cls.Config is None:
        if fields or (options is not None and not _empty(options)):
            raise ValueError(f"loss weighting {method!r} has no options, got {fields or options}")
        return cls(tasks)
    if options is None or isinstance(options, Mapping):
        options = from_dict(cls.Config, {**dict(options or {}), **fields}, f"loss.{method}.")
    elif fields:
        options = dataclasses.replace(options, **fields)
    return cls(tasks, options)


def _empty(options: Any) -> bool:
    return (isinstance(options, Mapping) and not options) or (dataclasses.is_dataclass(options)
                                                              and not dataclasses.fields(options))
