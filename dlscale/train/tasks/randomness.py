"""Random draws of the self-supervised tasks (MAE masks, contrastive views), reproducible across resumes.

Each training forward gets a fresh generator on the images' device, seeded from (run seed, rank, task, draw
count): ranks draw differently, nothing waits on the host, and the draw count lives in the head's state dict
(checkpointed with the model), so a resumed run draws what the uninterrupted one would have. Evaluation always
uses the same seed, so validation numbers of different epochs compare like with like.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_EVAL_DRAW = -1


def seeded_generator(device: torch.device, salt: int, draw: int) -> torch.Generator:
    """A generator on `device` seeded from the run seed (`torch.initial_seed()`), this rank, `salt` and `draw`
    (hashes of ints are the same in every process); evaluation draws (`draw` < 0) do not depend on the rank."""
    rank = dist.get_rank() if draw >= 0 and dist.is_available() and dist.is_initialized() else 0
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((torch.initial_seed(), rank, salt, draw)) % (2 ** 63))
    return generator


class SeededDraws:
    """Mixin for task heads (put it before `nn.Module` in the bases) that draw random numbers every step."""

    seed_salt: int = 0
    """Different for each task, so two tasks of one model draw independently."""

    def next_generator(self, device: torch.device, training: bool) -> torch.Generator:
        """The generator of this forward: a new draw in training, the fixed evaluation one otherwise."""
        if not training:
            return seeded_generator(device, self.seed_salt, _EVAL_DRAW)
        draw = self.draws
        self.draws = draw + 1
        return seeded_generator(device, self.seed_salt, draw)

    @property
    def draws(self) -> int:
        """Training draws so far (one per training forward, micro-batches included)."""
        return getattr(self, "_draws", 0)

    @draws.setter
    def draws(self, value: int) -> None:
        self._draws = value

    def get_extra_state(self) -> dict:
        return {"draws": self.draws}

    def set_extra_state(self, state: dict) -> None:
        self.draws = int(state["draws"])


def step_draw(head: SeededDraws, batch: dict, task: str) -> tuple[int, bool]:
    """(draw number, replay) of a training forward. The draw is recorded in the batch (key `_draw/<task>`), so a
    second forward of the same batch (UPGrad's per-task gradients, on a forward of its own) replays the masks or
    views of the first instead of drawing new ones, and per-step updates (BYOL's target) happen once per step."""
    key = f"_draw/{task}"
    if key in batch:
        return int(batch[key]), True
    draw = batch[key] = head.draws
    head.draws = draw + 1
    return draw, False
