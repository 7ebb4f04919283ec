"""Early stopping pays: one fixed small weighting sweep run with ASHA and again without early stopping (FIFO).

    python bench/tune.py [--trials 8] [--epochs 4] [--batches 6]      # prints JSON

Both sweeps sample the same configurations (same search seed) on simulated Model II images (64x64) with the small
encoder, in one local Ray, one CPU per trial; ASHA runs first, so any warm-up of the Ray session counts against it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import yaml  # noqa: E402

from dlscale.cli import main as dlscale  # noqa: E402
from dlscale.sweep import Resources, load_sweep, outcomes, ray_cluster, ranked, run_sweep  # noqa: E402

SPACE = {"loss.method": {"choice": ["fixed", "uncertainty", "dwa"]},
         "loss.weights.recon": {"loguniform": [0.01, 10.0]},
         "optim.lr": {"loguniform": [1.0e-5, 3.0e-2]}}


def sweep_summary(results, spec, seconds: float) -> dict:
    trials = ranked(outcomes(results, spec.base.schedule.epochs), spec.settings.metric, spec.settings.mode)
    best = trials[0]
    return {"wall_s": round(seconds, 1), "trials": len(trials),
            "completed": sum(t.status == "completed" for t in trials),
            "stopped_early": sum(t.status == "stopped early" for t in trials),
            "failed": sum(t.status == "failed" for t in trials),
            "epochs_trained": sum(t.epoch for t in trials),
            "best": {"trial": best.trial, **{k: best.params.get(k) for k in SPACE},
                     "val/auc_macro": round(best.value("val/auc_macro"), 4),
                     "val/recon_mse": round(best.value("val/recon_mse"), 5)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batches", type=int, default=6, help="batches of 32 per epoch")
    p.add_argument("--n-per-class", type=int, default=120)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        tmp = Path(tmp)
        if dlscale(["simulate", "--preset", "model_ii", "--n-per-class", str(args.n_per_class), "--out",
                    str(tmp / "data"), "--splits", "train=0.8,val=0.2", "--shard-size", "128"]):
            return 1
        train = {"stage": "multitask", "model": {"encoder": {"name": "small", "width": 8}},
                 "data": {"batch_size": 32, "num_workers": 0, "shuffle_buffer": 256},
                 "deepspeed": {"precision": "fp32"}, "optim": {"warmup_steps": 2},
                 "schedule": {"epochs": args.epochs, "batches_per_epoch": args.batches, "eval_every_epochs": 1,
                              "log_every": 1000, "keep_checkpoints": 1},
                 "eval": {"n_bootstrap": 10, "probe_samples": 64}}
        report: dict = {"device": "cpu", "cpus": os.cpu_count(), "trials": args.trials, "epochs": args.epochs,
                        "batches_per_epoch": args.batches, "images": "model_ii 64x64", "encoder": "small/8"}
        with ray_cluster() as cluster:
            for scheduler in ("asha", "fifo"):
                path = tmp / f"{scheduler}.yaml"
                path.write_text(yaml.safe_dump({"sweep": {"trials": args.trials, "scheduler": scheduler,
                                                          "grace_period": 1, "reduction_factor": 2, "seed": 0},
                                                "space": SPACE, "train": train}))
                spec = load_sweep(path, data_dir=str(tmp / "data"))
                start = time.perf_counter()
                results = run_sweep(spec, tmp / scheduler, Resources(), cluster)
                report[scheduler] = sweep_summary(results, spec, time.perf_counter() - start)
        report["asha_wall_time_saving"] = round(1 - report["asha"]["wall_s"] / report["fifo"]["wall_s"], 3)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
