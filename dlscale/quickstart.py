"""`dlscale quickstart` (`make demo`): simulated lensing data -> shards -> autoencoder -> supervised -> multi-task
(initialised from the autoencoder) -> evaluation with linear probes -> `report.md` next to the seed's numbers.

    dlscale quickstart --out runs/quickstart                 # CPU-sized: Model-II-like 64x64, a few minutes
    dlscale quickstart --out runs/full --scale full          # GPU: Model-I-like 150x150, 30,000 images per class
    dlscale quickstart --out /tmp/qs --scale tiny            # smoke test of every step (about a minute)

Finished steps (the dataset, each stage) are reused when the command is run again, unless `--force`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlscale.data.classes import CLASSES
from dlscale.report import save_roc

log = logging.getLogger(__name__)
STAGES = ("autoencoder", "supervised", "multitask")

# The notebook project dlscale starts from (DeepLense common-test data, 3,500 images per class).
SEED_RESULTS = {
    "autoencoder": {"probe/accuracy": 0.34},
    "supervised": {"accuracy": 0.62, "auc_macro": 0.81},
    "multitask": {"accuracy": 0.68, "auc_macro": 0.85, "auc/no_sub": 0.915, "auc/cdm": 0.807, "auc/axion": 0.840},
}


@dataclass(frozen=True)
class Scale:
    preset: str
    n_per_class: int
    sim_batch: int
    train: list[str]          # training config overrides shared by the three stages
    stage_epochs: dict[str, int]


SCALES = {
    # CPU: the small conv encoder (ResNet18 with the 3x3 stem costs ~7.7 s per batch of 32 on one core here).
    "small": Scale("model_ii", 2000, 32, [
        "--model.encoder.name=small", "--model.encoder.width=16", "--data.batch_size=32", "--data.num_workers=0",
        "--data.augment=false",
        "--optim.lr=3e-3", "--optim.warmup_steps=20", "--eval.probe_samples=2000", "--eval.n_bootstrap=200",
        "--schedule.log_every=20", "--schedule.checkpoint_every=500"], {"autoencoder": 2, "supervised": 12,
                                                                         "multitask": 6}),
    # Smoke test of the whole path in about a minute (what `make test` runs): the numbers mean nothing.
    "tiny": Scale("model_ii", 40, 32, [
        "--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=16", "--data.num_workers=0",
        "--eval.probe_samples=60", "--eval.n_bootstrap=20", "--schedule.log_every=2"],
        {"autoencoder": 1, "supervised": 1, "multitask": 1}),
    # GPUs: the public dataset's size, ResNet18 with the 3x3 stem, bf16.
    "full": Scale("model_i", 30000, 512, [
        "--model.encoder.name=resnet18", "--model.encoder.small_input_stem=true", "--data.batch_size=128",
        "--data.num_workers=8", "--optim.lr=1e-3", "--optim.warmup_steps=500", "--eval.probe_samples=10000",
        "--schedule.log_every=50", "--schedule.checkpoint_every=1000"], {"autoencoder": 15, "supervised": 30,
                                                                          "multitask": 30}),
}


def stage_overrides(stage: str, scale: Scale, out: Path) -> list[str]:
    extra = [f"--schedule.epochs={scale.stage_epochs[stage]}"]
    if stage == "multitask":
        extra += ["--loss.method=fixed", "--loss.fixed.weights={recon: 1.0, classification: 1.0}",
                  "--init-from", str(out / "autoencoder" / "encoder.pt")]
    return scale.train + extra


def is_done(run_dir: Path) -> bool:
    return (run_dir / "encoder.pt").is_file() and (run_dir / "metrics.json").is_file()


def make_data(out: Path, scale: Scale, seed: int, force: bool) -> Path:
    from dlscale.sim import simulate_main
    data = out / "data"
    if (data / "manifest.json").is_file() and not force:
        log.info("reusing the simulated dataset in %s", data)
        return data
    shutil.rmtree(data, ignore_errors=True)
    simulate_main(["--preset", scale.preset, "--n-per-class", str(scale.n_per_class), "--out", str(data),
                   "--splits", "train=0.8,val=0.2", "--seed", str(seed), "--batch-size", str(scale.sim_batch)])
    return data


def local_ranks() -> int:
    """Data-parallel ranks for this machine: every GPU, or on CPU up to 2 one-thread processes (1.4-1.7x here)."""
    gpus = torch.cuda.device_count()
    return gpus if gpus else min(2, os.cpu_count() or 1)


def train_stage(stage: str, data: Path, out: Path, scale: Scale, seed: int) -> None:
    """One stage through the DeepSpeed engine: in this process, or on all local ranks through torchrun."""
    run_dir = out / stage
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--stage", stage, "--data", str(data), "--run-dir", str(run_dir), f"--seed={seed}",
            *stage_overrides(stage, scale, out)]
    ranks = local_ranks()
    if ranks > 1:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                        "-m", "dlscale.train", *args], check=True, env=env)
        return
    from dlscale.train.cli import main as train_main
    train_main(args)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def write_report(out: Path, data: Path) -> Path:
    """report.md (one table, our stages next to the seed's), roc.png with the stages overlaid."""
    manifest = json.loads((data / "manifest.json").read_text())
    rows, curves = [], {}
    header = ("| stage | accuracy | macro AUC (95% CI) | " + " | ".join(f"AUC {c}" for c in CLASSES)
              + " | probe acc | probe AUC | recon MSE |")
    rows += [header, "|" + "---|" * (header.count("|") - 1)]
    for stage in STAGES:
        m = json.loads((out / stage / "metrics.json").read_text())
        ci = f" ({_fmt(m.get('val/auc_macro_ci_low'))}-{_fmt(m.get('val/auc_macro_ci_high'))})" \
            if m.get("val/auc_macro") is not None else ""
        rows.append(f"| dlscale {stage} | {_fmt(m.get('val/accuracy'))} | {_fmt(m.get('val/auc_macro'))}{ci} | "
                    + " | ".join(_fmt(m.get(f"val/auc/{c}")) for c in CLASSES)
                    + f" | {_fmt(m.get('probe/accuracy'))} | {_fmt(m.get('probe/auc_macro'))} | "
                    f"{_fmt(m.get('val/recon_mse'), 5)} |")
        seed = SEED_RESULTS[stage]
        rows.append(f"| seed {stage} | {_fmt(seed.get('accuracy'))} | {_fmt(seed.get('auc_macro'))} | "
                    + " | ".join(_fmt(seed.get(f"auc/{c}")) for c in CLASSES)
                    + f" | {_fmt(seed.get('probe/accuracy'))} | - | - |")
        scores = out / stage / "scores_val.npz"
        if scores.is_file():
            with np.load(scores) as z:
                if "probs" in z:
                    curves[stage] = (z["probs"], z["labels"])
    if curves:
        save_roc(out / "roc.png", curves, CLASSES)
    val = manifest["splits"]["val"]
    source = manifest["source"]
    lines = [
        "# dlscale quickstart report", "",
        f"Data: simulated `{source.get('preset')}` images {'x'.join(map(str, manifest['image_shape']))}, "
        f"{manifest['splits']['train']['samples']} train / {val['samples']} validation samples "
        f"({', '.join(f'{c} {n}' for c, n in val['class_counts'].items())} in validation), seed {source.get('seed')}.",
        "All metrics on the whole validation split; probe = logistic regression on the frozen encoder's features.",
        "", *rows, "",
        "Seed rows: the notebook project dlscale starts from (DeepLense common-test data, 3,500 images per class). "
        "**The datasets differ**, so the rows are a reference point, not a like-for-like comparison.", "",
        f"- ROC curves, stages overlaid: `{out / 'roc.png'}`",
        f"- TensorBoard: `tensorboard --logdir {out}` (one run per stage)",
        f"- Exported encoder (multi-task): `{out / 'multitask' / 'encoder.pt'}` -> "
        "`dlscale.load_encoder(path)`", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def quickstart(out: Path, scale_name: str = "small", force: bool = False, seed: int = 0) -> Path:
    scale = SCALES[scale_name]
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out, scale, seed, force)
    for stage in STAGES:
        if is_done(out / stage) and not force:
            log.info("reusing the finished %s run in %s", stage, out / stage)
            continue
        log.info("training stage %s", stage)
        train_stage(stage, data, out, scale, seed)
    return write_report(out, data)


def quickstart_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlscale quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo every step even if it finished before")
    a = p.parse_args(argv)
    report = quickstart(a.out, a.scale, a.force, a.seed)
    print(f"\n{report.read_text()}", flush=True)
    return 0
