"""The files of a run directory, written in one place: config.yaml, git.txt, log.txt, metrics.json, model.pt,
encoder.pt (every write atomic, through `dlscale.io`).

    RUN/config.yaml    the resolved config (`dlscale train --config RUN/config.yaml` repeats the run)
    RUN/git.txt        the code version
    RUN/log.txt        rank 0's log
    RUN/metrics.json   every evaluation's metrics, merged (the last value of each key wins)
    RUN/model.pt       the whole model's state dict (fp32, CPU): `dlscale eval` reloads it
    RUN/encoder.pt     the exported encoder: `dlscale.load_encoder(path)`
    RUN/encoder.safetensors + RUN/encoder.json   the same encoder, portable: loads without pickle (also in timm)
    RUN/simulation.json  (data.source=simulate) the simulator config and seeds of the training stream
    RUN/eval_data/     (data.source=simulate without data_dir) the fixed evaluation set simulated once
    RUN/checkpoints/   DeepSpeed tags (dlscale.train.checkpoint)
"""
from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import nn

from dlscale import io
from dlscale.configtree import dump_yaml
from dlscale.data.classes import CLASSES
from dlscale.export import cpu_state_dict, save_encoder, save_portable_encoder
from dlscale.train.checkpoint import CHECKPOINTS
from dlscale.train.sources import source_of

METRICS = "metrics.json"


def check_new(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise ValueError(f"run directory {run_dir} exists; pass --resume auto to continue it, or choose a new "
                         "--run-dir")


def create(run_dir: Path, cfg, stream=None) -> None:
    """Rank 0, once everything was validated: the directory, its checkpoint folder, config.yaml, git.txt and, for
    a simulated training stream, simulation.json (everything that regenerates its batches bit for bit: its
    source's `record`; for an adapt run with a simulated side, `labelled` and / or `target`)."""
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    io.write_text(run_dir / "config.yaml", dump_yaml(cfg))
    io.write_text(run_dir / "git.txt", git_description() + "\n")
    record = source_of(stream, cfg).record(stream) if stream is not None else None
    if record is not None:
        io.write_json(run_dir / "simulation.json", record)


def git_description() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return rev.stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


@contextlib.contextmanager
def run_log(run_dir: Path | None) -> Iterator[None]:
    """Copy this process's log records into RUN/log.txt for the duration of the run (rank 0 passes its run
    directory, other ranks None); the process's own logging set-up is left as it was."""
    if run_dir is None:
        yield
        return
    handler = logging.FileHandler(run_dir / "log.txt")
    root = logging.getLogger()
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
        for f in root.handlers[0].filters:
            handler.addFilter(f)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def update_metrics(path: Path, metrics: Mapping) -> dict:
    """Merge `metrics` into the metrics.json at `path` (created if missing); returns the merged record."""
    merged = {**(io.read_json(path) if path.is_file() else {}), **metrics}
    io.write_json(path, merged)
    return merged


def save_model(run_dir: Path, model: nn.Module) -> None:
    io.save_torch(run_dir / "model.pt", cpu_state_dict(model))


def export_encoder(run_dir: Path, model: nn.Module, cfg, image_shape, stats: dict | None, manifest: dict,
                   extra: dict | None = None) -> Path:
    """encoder.pt with what a downstream user needs: classes, input shape and normalisation, the stage, the
    regression targets and their statistics, the data it was trained on (with any resize), and `extra` (e.g. the
    provenance of an AdaBN run)."""
    path = run_dir / "encoder.pt"
    info = {"classes": list(CLASSES), "image_shape": list(image_shape), "normalize": cfg.data.normalize,
            "stage": cfg.stage, "targets": list(cfg.data.targets), "target_stats": stats,
            "data": {"dir": str(cfg.data_dir), "source": manifest.get("source"),
                     "image_shape": manifest["image_shape"], "resize": cfg.data.resize,
                     "resize_mode": cfg.data.resize_mode}, **(extra or {})}
    save_encoder(path, model.encoder, cfg.model.encoder, info)
    save_portable_encoder(run_dir, model.encoder, cfg.model.encoder, info)
    return path
