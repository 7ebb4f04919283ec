"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liu, Jin, Stone & Liu, NeurIPS 2023).

Balances tasks by the *rate* at which each loss falls, at O(1) cost per step (no per-task gradients). With task
logits xi (K numbers) and z = softmax(xi), the model minimises

    sum_i c * z_i * log(L_i - m_i),        c = 1 / sum_j (z_j / (L_j - m_j))   (c treated as a constant)

so task i's gradient is weighted by w_i = c * z_i / (L_i - m_i) (the weights sum to 1; m_i is a lower bound of
L_i, 0 for MSE and cross-entropy). After each step the logits follow the paper's Algorithm 1:

    delta = J_softmax(xi)^T (log(L_prev - m) - log(L_now - m)),    xi <- xi - beta * (delta + gamma * xi)

i.e. a task whose log-loss fell less than the others' gains weight. The paper re-evaluates the batch after the
step to get L_now; here L_now is the next step's loss (one forward per step, the O(1) budget), averaged across
ranks so every rank holds the same logits. The logits and the previous losses are the module's extra state, so
they travel in checkpoints and are never cast to bf16.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dlscale.train.weighting.base import LossWeighting, register_weighting


@dataclass
class FAMOConfig:
    lr: float = 0.025
    """beta: step size of the task logits."""
    weight_decay: float = 0.001
    """gamma: decay of the task logits towards equal weights."""
    min_losses: dict[str, float] | None = None
    """m_i: a lower bound of each task's loss (default 0 for every task)."""
    eps: float = 1e-8
    """Added to L_i - m_i before the log."""


@register_weighting
class FAMO(LossWeighting):
    name = "famo"
    Config = FAMOConfig

    def __init__(self, tasks: Sequence[str], options: FAMOConfig | None = None) -> None:
        super().__init__(tasks, options or FAMOConfig())
        o = self.options
        if not (o.lr > 0 and o.weight_decay >= 0 and o.eps > 0):
            raise ValueError(f"loss.famo: lr must be > 0, weight_decay >= 0 and eps > 0; got {o}")
        if o.min_losses is not None:
            self.check_tasks(o.min_losses, "loss.famo.min_losses")
        self.min_losses = [float((o.min_losses or {}).get(t, 0.0)) for t in self.tasks]
        self.logits = [0.0] * len(self.tasks)
        self.previous: list[float] | None = None
        self._last: dict[str, float] = {task: 1.0 / len(self.tasks) for task in self.tasks}

    @property
    def z(self) -> list[float]:
        peak = max(self.logits)
        exps = [math.exp(x - peak) for x in self.logits]
        return [e / sum(exps) for e in exps]

    @property
    def weights(self) -> dict[str, float]:
        """The gradient weights c * z_i / (L_i - m_i) of the last step (z itself before the first)."""
        return dict(self._last)

    def update_logits(self, losses_now: Sequence[float]) -> None:
        """One step of Algorithm 1 from the previous and current (rank-averaged) losses."""
        if self.previous is not None:
            gain = [math.log(max(p - m, 0.0) + self.options.eps) - math.log(max(n - m, 0.0) + self.options.eps)
                    for p, n, m in zip(self.previous, losses_now, self.min_losses)]
            z = self.z
            mean_gain = sum(zi * g for zi, g in zip(z, gain))
            delta = [zi * (g - mean_gain) for zi, g in zip(z, gain)]   # J_softmax^T gain, J = diag(z) - z z^T
            beta, gamma = self.options.lr, self.options.weight_decay
            self.logits = [x - beta * (d + gamma * x) for x, d in zip(self.logits, delta)]
        self.previous = list(losses_now)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        self.check_tasks(losses)
        stacked = torch.stack([losses[t].float() for t in self.tasks])
        if self.training and torch.is_grad_enabled():
            now = stacked.detach().double()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                now = now.clone()
                dist.all_reduce(now)
                now /= dist.get_world_size()
            self.update_logits(now.tolist())
        z = torch.tensor(self.z, dtype=stacked.dtype, device=stacked.device)
        gaps = stacked - torch.tensor(self.min_losses, dtype=stacked.dtype, device=stacked.device) + self.options.eps
        c = 1.0 / (z / gaps.detach()).sum()
        weights = (c * z / gaps.detach()).tolist()
        self._last = dict(zip(self.tasks, weights))
        return (c * z * gaps.log()).sum(), dict(self._last)

    def get_extra_state(self) -> dict[str, Any]:
        return {"logits": list(self.logits), "previous": None if self.previous is None else list(self.previous)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["logits"]) != len(self.tasks):
            raise ValueError(f"saved FAMO state has {len(state['logits'])} task logits, this run has tasks "
                             f"{list(self.tasks)}")
        self.logits = [float(x) for x in state["logits"]]
        self.previous = None if state["previous"] is None else [float(x) for x in state["previous"]]
