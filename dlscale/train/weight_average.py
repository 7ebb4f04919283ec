"""An exponential moving average of the trained weights (Polyak averaging), `optim.ema`: the weights a run exports
and is scored with.

After every optimizer step each trainable parameter's average moves towards it, avg <- decay x avg + (1 - decay) x w
(torch's `swa_utils.get_ema_multi_avg_fn`), from the weights the run started with. SGD's last iterate carries the
noise of its last steps; the average over the last ~1 / (1 - decay) steps does not. The averages are kept in
float32 on every rank (the ranks hold the same weights, so the same averages), saved in every checkpoint (a resumed
run continues them exactly) and copied into the model after the last step, before the BatchNorm statistics are
re-estimated for them (`eval.precise_bn`: the running statistics were gathered with other weights)."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightAverage:
    """The moving average of `module`'s trainable parameters (frozen ones keep their values anyway)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().float().clone() for name, p in self.params.items()}
        self._update = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step."""
        self._update(list(self.average.values()), [p.detach().float() for p in self.params.values()], None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.average.keys():
            missing, extra = self.average.keys() - state.keys(), state.keys() - self.average.keys()
            raise ValueError(f"optim.ema: the checkpoint's weight average does not fit this model (missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})")
        for name, t in state.items():
            self.average[name].copy_(t)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the averages in place of the trained weights (in their dtype)."""
        for name, p in self.params.items():
            p.copy_(self.average[name])
