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
    """The logits, previous losses and last weights are float64 tensors on the losses' device (plain attributes,
    not buffers: never cast to bf16), so a step reads nothing back to the host; `logits`, `previous`, `z` and
    `weights` are host views for logs, tests and checkpoints."""
    name = "famo"
    Config = FAMOConfig

    def __init__(self, tasks: Sequence[str], options: FAMOConfig | None = None) -> None:
        super().__init__(tasks, options or FAMOConfig())
        o = self.options
        if not (o.lr > 0 and o.weight_decay >= 0 and o.eps > 0):
            raise ValueError(f"loss.famo: lr must be > 0, weight_decay >= 0 and eps > 0; got {o}")
        if o.min_losses is not None:
            self.check_tasks(o.min_losses, "loss.famo.min_losses")
        k = len(self.tasks)
        self._min = torch.tensor([float((o.min_losses or {}).get(t, 0.0)) for t in self.tasks], dtype=torch.float64)
        self._logits = torch.zeros(k, dtype=torch.float64)
        self._previous: torch.Tensor | None = None
        self._last = torch.full((k,), 1.0 / k, dtype=torch.float64)

    @property
    def logits(self) -> list[float]:
        return self._logits.tolist()

    @property
    def previous(self) -> list[float] | None:
        return None if self._previous is None else self._previous.tolist()

    @property
    def z(self) -> list[float]:
        return torch.softmax(self._logits, 0).tolist()

    @property
    def weights(self) -> dict[str, float]:
        """The gradient weights c * z_i / (L_i - m_i) of the last step (z itself before the first)."""
        return dict(zip(self.tasks, self._last.tolist()))

    def _to(self, device: torch.device) -> None:
        if self._logits.device != device:
            self._min, self._logits, self._last = (t.to(device) for t in (self._min, self._logits, self._last))
            self._previous = None if self._previous is None else self._previous.to(device)

    def update_logits(self, losses_now: torch.Tensor) -> None:
        """One step of Algorithm 1 from the previous and current (rank-averaged) losses."""
        if self._previous is not None:
            eps = self.options.eps
            gain = ((self._previous - self._min).clamp(min=0.0) + eps).log() \
                - ((losses_now - self._min).clamp(min=0.0) + eps).log()
            z = torch.softmax(self._logits, 0)
            delta = z * (gain - (z * gain).sum())   # J_softmax^T gain, J = diag(z) - z z^T
            beta, gamma = self.options.lr, self.options.weight_decay
            self._logits = self._logits - beta * (delta + gamma * self._logits)
        self._previous = losses_now.clone()

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_tasks(losses)
        stacked = torch.stack([losses[t].float() for t in self.tasks])
        self._to(stacked.device)
        if self.training and torch.is_grad_enabled():
            now = stacked.detach().double()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(now)   # a device-side collective: the host does not wait for it
                now /= dist.get_world_size()
            self.update_logits(now)
        z = torch.softmax(self._logits, 0).to(stacked.dtype)
        gaps = stacked - self._min.to(stacked.dtype) + self.options.eps
        c = 1.0 / (z / gaps.detach()).sum()
        self._last = (c * z / gaps.detach()).double()
        return (c * z * gaps.log()).sum(), dict(zip(self.tasks, self._last.detach().unbind()))

    def get_extra_state(self) -> dict[str, Any]:
        return {"logits": self.logits, "previous": self.previous}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["logits"]) != len(self.tasks):
            raise ValueError(f"saved FAMO state has {len(state['logits'])} task logits, this run has tasks "
                             f"{list(self.tasks)}")
        device = self._logits.device
        self._logits = torch.tensor([float(x) for x in state["logits"]], dtype=torch.float64, device=device)
        self._previous = None if state["previous"] is None else \
            torch.tensor([float(x) for x in state["previous"]], dtype=torch.float64, device=device)
