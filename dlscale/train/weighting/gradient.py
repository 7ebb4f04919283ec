"""UPGrad (Quinton & Rey 2024, through torchjd): a gradient-based weighting that never lets one task's update
work against another's on the shared encoder.

In the backward hook each task's gradient on the encoder parameters is computed, averaged across ranks, and
torchjd's UPGrad weighting turns their Gramian into task weights w; the engine then back-propagates sum_i w_i L_i
once. On the encoder that gradient is exactly UPGrad's aggregate J^T w; each head gets w_i times its own task's
gradient. The per-task gradients come from a second forward of the model (`torch.func.functional_call` with copies
of the buffers, so BatchNorm statistics move once per step) and K backward passes: DeepSpeed hooks the outputs of
its own forward and would take gradients through them for its backward. Because the final backward is the engine's
ordinary one, DeepSpeed's reduction and partitioning are untouched: ZeRO 0, 1 and 2 are tested. Cost per step:
one more forward and K more backward passes. Per-task gradients are taken in the training precision (fp32 or bf16;
fp16's loss scaling is not applied to them).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.func import functional_call

from dlscale.train.weighting.base import LossWeighting, register_weighting


@register_weighting
class UPGrad(LossWeighting):
    name = "upgrad"

    def __init__(self, tasks: Sequence[str], options: Any = None) -> None:
        super().__init__(tasks)
        try:
            from torchjd.aggregation import UPGradWeighting
        except ImportError as err:
            raise ValueError(f"loss.method=upgrad needs torchjd with its QP solver: pip install "
                             f"'torchjd[quadprog-projector]' ({err})") from None
        self.weighting = UPGradWeighting()
        self._last = {task: 1.0 for task in self.tasks}

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._last)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The plain sum (what is logged as the total); the weights are chosen in `backward`."""
        self.check_tasks(losses)
        return sum(losses[t] for t in self.tasks), self.weights

    def task_weights(self, jacobian: torch.Tensor) -> torch.Tensor:
        """(K, n) per-task gradients -> (K,) UPGrad weights."""
        gramian = jacobian.double() @ jacobian.double().T
        return self.weighting(gramian).to(jacobian.dtype)

    def backward(self, engine, losses: Mapping[str, torch.Tensor], total: torch.Tensor, images: torch.Tensor,
                 batch: dict) -> None:
        module = engine.module
        shared = [name for name, p in module.named_parameters() if name.startswith("encoder.") and p.requires_grad]
        state = {**dict(module.named_parameters()), **{k: v.clone() for k, v in module.named_buffers()}}
        out = functional_call(module, state, (images, batch))   # a graph of our own: no engine hooks, BN stats kept
        again = module.losses(out, images, batch)
        rows = []
        for task in self.tasks:
            grads = torch.autograd.grad(again[task], [state[n] for n in shared], retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(state[n])).flatten().float()
                                   for g, n in zip(grads, shared)]))
        jacobian = torch.stack(rows)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(jacobian)
            jacobian /= dist.get_world_size()
        w = self.task_weights(jacobian)
        self._last = dict(zip(self.tasks, w.tolist()))
        engine.backward(sum(w[i].to(losses[t].dtype) * losses[t] for i, t in enumerate(self.tasks)))
