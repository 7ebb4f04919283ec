"""The classic loss weightings: fixed weights, homoscedastic uncertainty (Kendall 2018), DWA (Liu 2019)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlscale.train.weighting.base import LossWeighting, register_weighting


@dataclass
class FixedConfig:
    weights: dict[str, float] | None = None
    """Per-task weights, e.g. {recon: 0.1, classification: 1.0}; default 1 for every task."""


@dataclass
class DWAConfig:
    temperature: float = 2.0
    """Softmax temperature T of the loss-ratio weights (larger: more even weights)."""


@register_weighting
class FixedWeighting(LossWeighting):
    """Constant, user-chosen weights: total = sum_t w_t * L_t."""
    name = "fixed"
    Config = FixedConfig

    def __init__(self, tasks: Sequence[str], options: FixedConfig | None = None) -> None:
        super().__init__(tasks, options or FixedConfig())
        weights = self.options.weights if self.options.weights is not None else {t: 1.0 for t in self.tasks}
        if set(weights) != set(self.tasks):
            raise ValueError(f"fixed loss weights (loss.fixed.weights) are given for {sorted(weights)}, the model "
                             f"trains {list(self.tasks)}")
        self._weights = {task: float(weights[task]) for task in self.tasks}

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)


@register_weighting
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), weights learned with the model.

    One learned log-variance s_t = log sigma_t^2 per task (initially 0, i.e. weight 1):

        total = sum_t exp(-s_t) * L_t + s_t,    effective weight exp(-s_t).

    The same form serves every task: it is twice Kendall's Gaussian-likelihood objective
    (L / (2 sigma^2) + log sigma) for regression and reconstruction losses (MSE), and for cross-entropy it uses
    log sigma^2 where the paper's approximation has log sigma. Either way the optimum is exp(-s_t) = 1 / L_t,
    so tasks are balanced by their loss scale. The total can go negative; only its gradient matters.
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str], options: Any = None) -> None:
        super().__init__(tasks)
        self.log_variances = nn.Parameter(torch.zeros(len(self.tasks)))

    @property
    def weights(self) -> dict[str, float]:
        """Current effective weights exp(-s_t)."""
        # One host transfer for all tasks, not one per task.
        return dict(zip(self.tasks, torch.exp(-self.log_variances.detach()).float().tolist()))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        self.check_tasks(losses)
        task_losses = torch.stack([losses[task] for task in self.tasks])
        precision = torch.exp(-self.log_variances)
        return (precision * task_losses + self.log_variances).sum(), dict(zip(self.tasks, precision.detach().unbind()))


@register_weighting
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): favour the tasks whose loss falls slowest.

    With r_t = L_t(epoch e-1) / L_t(epoch e-2) from the per-task mean losses of the last two epochs,
    w_t = K * softmax_t(r_t / T) (K tasks, temperature T), so the weights sum to K. Weights are 1 until two epochs
    have ended. Call `end_epoch` once per epoch, on every rank, with the unweighted per-task epoch means already
    all-reduced across ranks, so that all ranks hold the same weights. The loss history is the module's extra
    state: it travels in `state_dict()` / `load_state_dict()` and hence in the engine's checkpoints.
    """

    name = "dwa"
    Config = DWAConfig

    def __init__(self, tasks: Sequence[str], options: DWAConfig | None = None) -> None:
        super().__init__(tasks, options or DWAConfig())
        if not self.options.temperature > 0:
            raise ValueError(f"loss.dwa.temperature must be > 0, got {self.options.temperature}")
        self.temperature = float(self.options.temperature)
        self.history: list[dict[str, float]] = []
        """Per-task mean losses of the last two finished epochs, oldest first."""

    @property
    def weights(self) -> dict[str, float]:
        """Weights for the current epoch."""
        if len(self.history) < 2:
            return {task: 1.0 for task in self.tasks}
        before, last = self.history
        scaled = [last[task] / before[task] / self.temperature for task in self.tasks]
        peak = max(scaled)  # subtracted for a numerically safe softmax
        exps = [math.exp(value - peak) for value in scaled]
        return {task: len(self.tasks) * e / sum(exps) for task, e in zip(self.tasks, exps)}

    def end_epoch(self, mean_losses: Mapping[str, float]) -> dict[str, float]:  # type: ignore[override]
        """Record an epoch's all-reduced per-task mean losses; return the weights for the next epoch."""
        self.check_tasks(mean_losses, "mean_losses")
        means = {task: float(mean_losses[task]) for task in self.tasks}
        bad = {task: value for task, value in means.items() if not (math.isfinite(value) and value > 0)}
        if bad:
            raise ValueError(f"DWA needs finite positive epoch mean losses, got {bad}")
        self.history = (self.history + [means])[-2:]
        return self.weights

    def get_extra_state(self) -> dict[str, Any]:
        return {"history": [dict(epoch) for epoch in self.history]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        history = [dict(epoch) for epoch in state["history"]]
        for epoch in history:
            self.check_tasks(epoch, "saved DWA history")
        self.history = history
