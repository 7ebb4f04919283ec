"""Combine per-task losses into the one loss the engine back-propagates.

Every weighting is an `nn.Module` living inside the model (`MultiTaskModel.weighting`), so learned weights are
updated by the engine's optimizer and any state is saved in the engine's checkpoints with the module.
`forward(losses)` takes `{task: scalar loss}` with exactly the weighting's tasks and returns
`(total, {task: effective weight})`; the weights are plain floats for logging and checkpoint client state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

WEIGHTING_METHODS: tuple[str, ...] = ("fixed", "uncertainty", "dwa")


class LossWeighting(nn.Module):
    """Common part: the task list and the check that a loss dict holds exactly those tasks."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"loss weighting needs distinct task names, got {list(tasks)}")
        self.tasks: tuple[str, ...] = tuple(tasks)

    def check_tasks(self, values: Mapping[str, Any], what: str = "losses") -> None:
        """Raise naming the missing and unexpected tasks unless `values` has exactly this weighting's tasks."""
        missing = sorted(set(self.tasks) - set(values))
        unexpected = sorted(set(values) - set(self.tasks))
        if missing or unexpected:
            raise ValueError(f"{what} must have tasks {list(self.tasks)}: missing {missing}, unexpected {unexpected}")

    def weighted_sum(
        self, losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """sum_t w_t * L_t for constant weights (fixed and DWA)."""
        self.check_tasks(losses)
        total = sum(weights[task] * losses[task] for task in self.tasks)
        return total, dict(weights)


class FixedWeighting(LossWeighting):
    """Constant, user-chosen weights: total = sum_t w_t * L_t."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__(list(weights))
        self.weights = {task: float(weight) for task, weight in weights.items()}

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.weighted_sum(losses, self.weights)


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), weights learned with the model.

    One learned log-variance s_t = log sigma_t^2 per task (initially 0, i.e. weight 1):

        total = sum_t exp(-s_t) * L_t + s_t,    effective weight exp(-s_t).

    The same form serves every task: it is twice Kendall's Gaussian-likelihood objective
    (L / (2 sigma^2) + log sigma) for regression and reconstruction losses (MSE), and for cross-entropy it uses
    log sigma^2 where the paper's approximation has log sigma. Either way the optimum is exp(-s_t) = 1 / L_t,
    so tasks are balanced by their loss scale. The total can go negative; only its gradient matters.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
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
        return (precision * task_losses + self.log_variances).sum(), self.weights


class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): favour the tasks whose loss falls slowest.

    With r_t = L_t(epoch e-1) / L_t(epoch e-2) from the per-task mean losses of the last two epochs,
    w_t = K * softmax_t(r_t / T) (K tasks, temperature T), so the weights sum to K. Weights are 1 until two epochs
    have ended. Call `end_epoch` once per epoch, on every rank, with the unweighted per-task epoch means already
    all-reduced across ranks, so that all ranks hold the same weights. The loss history is the module's extra
    state: it travels in `state_dict()` / `load_state_dict()` and hence in the engine's checkpoints.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if not temperature > 0:
            raise ValueError(f"DWA temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
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

    def end_epoch(self, mean_losses: Mapping[str, float]) -> dict[str, float]:
        """Record an epoch's all-reduced per-task mean losses; return the weights for the next epoch."""
        self.check_tasks(mean_losses, "mean_losses")
        means = {task: float(mean_losses[task]) for task in self.tasks}
        bad = {task: value for task, value in means.items() if not (math.isfinite(value) and value > 0)}
        if bad:
            raise ValueError(f"DWA needs finite positive epoch mean losses, got {bad}")
        self.history = (self.history + [means])[-2:]
        return self.weights

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.weighted_sum(losses, self.weights)

    def get_extra_state(self) -> dict[str, Any]:
        return {"history": [dict(epoch) for epoch in self.history]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        history = [dict(epoch) for epoch in state["history"]]
        for epoch in history:
            self.check_tasks(epoch, "saved DWA history")
        self.history = history


def build_weighting(
    method: str,
    tasks: Sequence[str],
    weights: Mapping[str, float] | None = None,
    temperature: float = 2.0,
) -> LossWeighting:
    """Build the weighting `method` names for `tasks`. `weights` (fixed only) default to 1 for every task."""
    if method not in WEIGHTING_METHODS:
        raise ValueError(f"unknown loss weighting {method!r}: expected one of {', '.join(WEIGHTING_METHODS)}")
    if weights is not None and method != "fixed":
        raise ValueError(f"loss weights are only used by the 'fixed' weighting, not {method!r}")
    if method == "fixed":
        if weights is None:
            weights = {task: 1.0 for task in tasks}
        if set(weights) != set(tasks):
            raise ValueError(f"fixed loss weights are given for {sorted(weights)}, the model trains {list(tasks)}")
        return FixedWeighting({task: weights[task] for task in tasks})
    if method == "uncertainty":
        return UncertaintyWeighting(tasks)
    return DynamicWeightAverage(tasks, temperature)
