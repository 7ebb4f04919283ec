"""DeepSpeed checkpoints of a run: save (every rank), mark complete, prune, and load the newest complete tag, also
on another number of ranks than wrote it.

A tag is `step<global step>`; its client state is the trainer's small state (epoch, batch in epoch, samples seen,
epoch loss sums of every rank, seed, world size, target statistics, loss weights). DeepSpeed's own `latest` is
written before the other ranks' files are, so it proves nothing: here, once every rank has written its files
(barrier), rank 0 writes `complete.json` into the tag (every file with its size, the world size, the samples seen)
and only then `latest`. A tag without a complete.json that matches its files (killed while writing, a truncated or
missing file) is incomplete: `load` names it and resumes from the newest complete one. Tags are ordered by
samples seen, not by step number, because steps count batches of another size after a resume on another number
of ranks.

Another number of ranks: ZeRO stages 1-2 (and DeepSpeed's bf16 optimizer) keep the optimizer state partitioned
per rank, so rank 0 first converts the tag into a DeepSpeed universal checkpoint (`ds_to_universal`), kept in
checkpoints/universal/<tag>, which every rank then loads with the engine's `checkpoint.load_universal` setting.
`position` carries the data position over as samples: the resumed run continues at the epoch, batch and
learning-rate step an uninterrupted run on the new number of ranks would be at.
"""
from __future__ import annotations

import argparse
import contextlib
import io as _io
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dlscale import io

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
UNIVERSAL = "universal"
MODEL_STATES = "mp_rank_00_model_states.pt"
TAG = re.compile(r"step\d+(\.replaced)?")   # .replaced: an older layout's tag of the same step, kept while rewritten


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# ---- save ------------------------------------------------------------------------------------------------------

def save(engine, ckpt_dir: Path, client_state: dict, keep: int, is_main: bool) -> str:
    """Write the tag of the engine's current step on every rank, mark it complete, then (rank 0) delete all but the
    `keep` newest complete tags. Every rank's epoch loss sums go into the client state (they differ per rank)."""
    tag = tag_for(engine.global_steps)
    sums: list = [None] * dist.get_world_size()
    dist.all_gather_object(sums, client_state.get("epoch_loss_sums"))
    client_state = {**client_state, "epoch_loss_sums_per_rank": sums}
    if is_main:
        set_aside(ckpt_dir, tag)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()   # every rank has written its part
    if is_main:
        mark_complete(ckpt_dir / tag, {"world": dist.get_world_size(), "step": engine.global_steps,
                                       "samples_seen": client_state.get("samples_seen")})
        io.write_text(ckpt_dir / "latest", tag)
        shutil.rmtree(ckpt_dir / f"{tag}.replaced", ignore_errors=True)
        prune(ckpt_dir, keep)
    return tag


def set_aside(ckpt_dir: Path, tag: str) -> None:
    """Before `tag` is written: leftovers of an attempt killed while writing it go; a complete tag of that name
    (written by another number of ranks, whose steps count other batches: possibly the one this run resumed from)
    is kept as `<tag>.replaced` until the new one is complete, so a kill meanwhile loses nothing."""
    shutil.rmtree(ckpt_dir / UNIVERSAL / tag, ignore_errors=True)
    old, aside = ckpt_dir / tag, ckpt_dir / f"{tag}.replaced"
    if not old.exists():
        return
    if check_complete(old)[0] is None:
        shutil.rmtree(old)
        return
    shutil.rmtree(aside, ignore_errors=True)
    old.rename(aside)


def mark_complete(tag_dir: Path, info: dict) -> None:
    files = {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    io.write_json(tag_dir / COMPLETE, {**info, "files": files})


def check_complete(tag_dir: Path) -> tuple[dict | None, str]:
    """(complete.json's record, "") for a tag whose files are all there with their recorded sizes, else
    (None, what is wrong)."""
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return None, f"no {COMPLETE} (its files were never all written: the run stopped while saving it)"
    try:
        record = io.read_json(marker)
        files = dict(record["files"])
    except (ValueError, KeyError, TypeError) as err:
        return None, f"unreadable {COMPLETE} ({err})"
    if not files:
        return None, f"{COMPLETE} lists no files"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != size:
            return None, f"{name} has {path.stat().st_size} bytes, {COMPLETE} recorded {size}"
    return record, ""


def tag_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.fullmatch(p.name)) if ckpt_dir.is_dir() \
        else []


def survey(ckpt_dir: Path) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """(complete tags with their records, oldest first; [(incomplete tag, what is wrong)])."""
    complete, damaged = [], []
    for tag_dir in tag_dirs(ckpt_dir):
        record, problem = check_complete(tag_dir)
        if record is None:
            damaged.append((tag_dir.name, problem))
        else:
            complete.append((tag_dir.name, record))
    complete.sort(key=lambda item: (item[1].get("samples_seen") or 0, item[1].get("step") or 0))
    return complete, damaged


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the `keep` newest complete tags; delete older ones, incomplete ones and orphaned universal copies."""
    complete, damaged = survey(ckpt_dir)
    kept = {tag for tag, _ in complete[-max(1, keep):]}
    for tag, problem in damaged:
        log.info("removing incomplete checkpoint %s: %s", ckpt_dir / tag, problem)
    for tag in [t for t, _ in complete if t not in kept] + [t for t, _ in damaged]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    universal = ckpt_dir / UNIVERSAL
    for converted in (universal.iterdir() if universal.is_dir() else []):
        if converted.name not in kept:
            shutil.rmtree(converted, ignore_errors=True) if converted.is_dir() else converted.unlink()


# ---- load ------------------------------------------------------------------------------------------------------

def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def newest_complete(ckpt_dir: Path) -> tuple[str, dict] | None:
    """Rank 0's choice (tag, complete.json record) of the tag to resume from, naming every damaged tag in the
    log; None when there is no tag at all. Raises when there are tags but none is complete."""
    complete, damaged = survey(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    chosen = complete[-1] if complete else None
    for tag, problem in damaged:
        named = " (named in `latest`)" if tag == latest else ""
        fallback = f"resuming from {chosen[0]}, the newest complete one" if chosen else "no complete tag to use"
        log.warning("checkpoint %s%s is incomplete: %s; %s", ckpt_dir / tag, named, problem, fallback)
    if chosen is None and damaged:
        raise RuntimeError(f"--resume: no complete checkpoint in {ckpt_dir} ({len(damaged)} incomplete: "
                           + "; ".join(f"{t}: {p}" for t, p in damaged)
                           + f"); remove {ckpt_dir} to start the run again from the beginning")
    return chosen


def load(engine, ckpt_dir: Path, world: int, is_main: bool) -> tuple[str, dict, int] | None:
    """(tag, client state, world size that wrote it) of the newest complete checkpoint, loaded into `engine`; None
    when there is none. A tag written by another number of ranks with partitioned optimizer state is converted to
    a universal checkpoint first (once, by rank 0)."""
    choice: list = [None]
    if is_main:
        try:
            choice = [newest_complete(ckpt_dir)]
        except Exception as err:   # every rank stops with the reason, none waits at the broadcast
            choice = [f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], str):
        raise RuntimeError(choice[0])
    if choice[0] is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", ckpt_dir)
        return None
    tag, record = choice[0]
    saved = int(record["world"])
    if saved != world and partitioned(record):
        if not engine.zero_optimization():   # DeepSpeed loads universal optimizer state through ZeRO only
            raise ValueError(f"checkpoint {ckpt_dir / tag} holds the partitioned state of DeepSpeed's bf16 optimizer "
                             f"(ZeRO stage 0) of {saved} ranks: resume it with {saved} ranks, or train with "
                             "deepspeed.zero_stage=1 or 2 to change the number of ranks on resume")
        universal = convert_to_universal(ckpt_dir, tag, is_main)
        path, client = load_universal(engine, universal, tag, ckpt_dir / tag / MODEL_STATES)
        log.info("checkpoint %s was written by %d rank(s) with partitioned optimizer state; loaded its universal "
                 "form %s on %d rank(s)", tag, saved, universal / tag, world)
    else:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    return tag, client, saved


def partitioned(record: dict) -> bool:
    """Whether a tag holds per-rank optimizer partitions (ZeRO 1-2, bf16 optimizer) rather than one state."""
    return any(name.endswith("optim_states.pt") for name in record["files"])


def convert_to_universal(ckpt_dir: Path, tag: str, is_main: bool) -> Path:
    """checkpoints/universal, holding `tag` in DeepSpeed's universal form (converted by rank 0 unless a complete
    conversion is already there); every rank returns once it is."""
    from deepspeed.checkpoint import ds_to_universal
    out_root = ckpt_dir / UNIVERSAL
    outcome: list = [None]
    if is_main and check_complete(out_root / tag)[0] is None:
        partial = out_root / f"{tag}.partial"
        try:
            shutil.rmtree(out_root / tag, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
            out_root.mkdir(parents=True, exist_ok=True)
            args = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(partial),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            printed = _io.StringIO()   # the converter prints progress; it goes to the debug log instead
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                ds_to_universal.main(args)
            log.debug("ds_to_universal %s:\n%s", tag, printed.getvalue())
            (out_root / "latest_universal").unlink(missing_ok=True)   # names the partial folder; unused here
            partial.rename(out_root / tag)
            mark_complete(out_root / tag, {"source": tag})
            log.info("converted checkpoint %s to a universal checkpoint in %s", tag, out_root / tag)
        except Exception as err:
            outcome = [f"converting checkpoint {ckpt_dir / tag} to a universal checkpoint failed: "
                       f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RuntimeError(outcome[0])
    return out_root


def load_universal(engine, load_dir: Path, tag: str, model_states: Path) -> tuple[str | None, dict]:
    """Load a universal checkpoint: DeepSpeed reads `checkpoint.load_universal` only while loading, so it is set
    for this call. It restores parameters and optimizer state; buffers (BatchNorm statistics) and extra states
    (loss-weighting history) are not parameters, so they come from the source tag's model states."""
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    finally:
        engine._config.load_universal_checkpoint = previous
    state = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    parameters = {name for name, _ in engine.module.named_parameters()}
    rest = {k: v for k, v in state.items() if k not in parameters}
    unexpected = engine.module.load_state_dict(rest, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"{model_states}: entries this model does not have: {unexpected[:5]}")
    return path, client


# ---- the trainer's position on another number of ranks ---------------------------------------------------------

@dataclass
class Position:
    """Where a resumed trainer continues: epoch, batch in the epoch, optimizer step, samples seen, and this rank's
    epoch loss sums over its `count` batches of the epoch so far."""
    epoch: int
    batch_in_epoch: int
    step: int
    samples_seen: int
    sums: dict
    count: int
    converted: bool


def position(client: dict, world: int, rank: int, batch_size: int, batches: int, grad_accum: int) -> Position:
    """The trainer position of a loaded client state on this layout (`world` ranks of `batch_size`, `batches` per
    epoch). The same layout continues exactly where it stopped. Another layout keeps the epoch and maps the samples
    seen in it to whole batches of the new size (a remainder smaller than one global batch is dropped), and takes
    the optimizer step an uninterrupted run would be at there; each rank's epoch loss sums are the epoch's mean so
    far times its batches, so the epoch-end means stay those of all samples seen."""
    epoch, done = int(client["epoch"]), int(client["batch_in_epoch"])
    old_world, old_batch = int(client.get("world", world)), int(client.get("batch_size", batch_size))
    per_rank = client.get("epoch_loss_sums_per_rank")
    samples_seen = int(client.get("samples_seen", client["step"] * grad_accum * old_batch * old_world))
    if (old_world, old_batch) == (world, batch_size):
        sums = per_rank[rank] if per_rank and rank < len(per_rank) else client["epoch_loss_sums"]
        return Position(epoch, done, int(client["step"]), samples_seen, dict(sums), int(client["epoch_batches"]),
                        False)
    in_epoch = int(client.get("samples_in_epoch", done * old_batch * old_world))
    batch = min(in_epoch // (batch_size * world), batches)
    count, old_count = batch, int(client["epoch_batches"])
    ranks_sums = per_rank or [client["epoch_loss_sums"]]
    means = {task: sum(s[task] for s in ranks_sums) / max(old_count * len(ranks_sums), 1) for task in ranks_sums[0]}
    if in_epoch % (batch_size * world):
        log.info("%d samples into epoch %d are %d batches of %d x %d rank(s) here; the last %d are not counted",
                 in_epoch, epoch, batch, batch_size, world, in_epoch % (batch_size * world))
    return Position(epoch, batch, (epoch * batches + batch) // grad_accum, samples_seen,
                    {task: m * count for task, m in means.items()}, count, True)


def set_step(engine, step: int, micro_steps: int) -> None:
    """Put the engine's step counters and learning-rate schedule at `step` (after a load on another layout, whose
    counters count the old layout's steps)."""
    engine.global_steps, engine.micro_steps = step, micro_steps
    engine.global_samples = step * engine.train_batch_size()
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        scheduler.last_epoch = step - 1
        scheduler.step()   # recomputes every group's learning rate for `step` from the schedule's own formula
