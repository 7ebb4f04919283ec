"""DeepSpeed checkpoints of a run: save (every rank), prune old tags, load the latest with its client state.

A tag is `step<global step>`; the client state is the trainer's small state (epoch, batch in epoch, epoch loss
sums, seed, world size, target statistics, loss weights). DeepSpeed writes `latest` only after every rank's
files, so a tag named there is complete.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def save(engine, ckpt_dir: Path, client_state: dict, keep: int, is_main: bool) -> str:
    """Write the tag of the engine's current step on every rank, then (rank 0) delete all but the `keep` newest."""
    tag = tag_for(engine.global_steps)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()   # every rank has written its part before old tags go
    if is_main:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    return tag


def saved_world(ckpt_dir: Path, tag: str) -> int | None:
    """The number of ranks that wrote `tag` (from its rank-0 model states file), None if unknown."""
    state_file = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    if not state_file.is_file():
        return None
    return torch.load(state_file, map_location="cpu", weights_only=False).get("world")


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load(engine, ckpt_dir: Path, world: int, zero_stage: int) -> tuple[str, dict] | None:
    """(tag, client state) of the latest complete checkpoint loaded into `engine`, or None when there is none.
    A ZeRO checkpoint partitioned for another number of ranks is refused with what to do instead."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        log.warning("--resume: no complete checkpoint in %s, starting from the beginning", ckpt_dir)
        return None
    saved = saved_world(ckpt_dir, tag)
    if saved not in (None, world) and zero_stage > 0:
        raise ValueError(f"checkpoint {ckpt_dir / tag} was written by {saved} ranks with ZeRO stage {zero_stage}; "
                         f"its optimizer state is partitioned for {saved} ranks: resume with {saved} ranks (or "
                         "start a new run with --init_from)")
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ValueError(f"could not load checkpoint {ckpt_dir / tag}")
    return tag, client
