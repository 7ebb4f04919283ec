"""Domain adaptation study: how much of the gap between a source-only classifier and a target-supervised one each
adaptation method closes, on simulated instrument shifts (CPU-sized: 64x64, the small CNN, one rank).

    python bench/adapt.py [--shifts ii_to_iii,noiseless_to_noisy] [--batches 600] [--eval-per-class 500]
                          [--work-dir runs/bench_adapt]                                         # prints JSON

Per shift, every method trains the same budget (`--batches` batches of 32 from the simulation stream, fresh lenses
every step) and is scored on the same simulated target evaluation set (`target/val`, its labels used for scoring
only):
  source_only        stage supervised on the source simulator (the target only scored)
  dann, coral, mmd   stage adapt (classification + dann / coral / mmd) with the unlabelled target stream
  target_supervised  stage supervised on the target simulator: the upper bound at the same budget
Reported: each method's target macro AUC and accuracy with 95% CIs, the share of the gap closed
((AUC - AUC_source_only) / (AUC_target_supervised - AUC_source_only)) with a paired bootstrap CI
(`dlscale.metrics.gap_closed`), the source-domain AUC (what adapting costs there), wall times and the machine load.
Finished runs in --work-dir are reused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHIFTS = {
    # Euclid-like (Model II: 0.101"/px, PSF 0.16") -> HST-like (Model III: 0.08"/px, PSF 0.08"); both 64x64
    "ii_to_iii": ({"preset": "model_ii"}, {"preset": "model_iii"}),
    # the same instrument: noiseless (as the preset) -> a short exposure (100 s) with Poisson and background noise
    "noiseless_to_noisy": ({"preset": "model_ii"},
                           {"preset": "model_ii", "overrides": "{instrument.noise: true, "
                                                               "instrument.exposure_time: [100, 100]}"}),
}
METHODS = {
    "source_only": ("supervised", []),
    "dann": ("adapt", ["--model.tasks=[classification,dann]"]),
    "coral": ("adapt", ["--model.tasks=[classification,coral]", "--loss.fixed.weights={classification: 1.0, coral: 10.0}"]),
    "mmd": ("adapt", ["--model.tasks=[classification,mmd]"]),
    "target_supervised": ("supervised", []),
}
ADAPTED = ("dann", "coral", "mmd")
TRAIN = ["--model.encoder.name=small", "--model.encoder.width=16", "--data.batch_size=32", "--data.num_workers=1",
         "--deepspeed.zero_stage=0", "--optim.lr=3e-3", "--optim.warmup_steps=50", "--schedule.log_every=100",
         "--schedule.checkpoint_every=100000", "--eval.n_bootstrap=200"]


def simulator_args(prefix: str, side: dict, per_class: int) -> list[str]:
    args = [f"--{prefix}.preset={side['preset']}", f"--{prefix}.eval_per_class={per_class}",
            f"--{prefix}.probe_per_class={per_class}"]
    return args + ([f"--{prefix}.overrides={side['overrides']}"] if "overrides" in side else [])


def run_method(shift: str, method: str, args, run_dir: Path) -> float:
    """Train one method (unless finished in an earlier call); returns its wall time (recorded beside the run)."""
    timing = run_dir / "bench_seconds.txt"
    if (run_dir / "metrics.json").is_file():
        return float(timing.read_text()) if timing.is_file() else float("nan")
    if run_dir.exists():   # an interrupted run of an earlier call: train it again
        shutil.rmtree(run_dir)
    source, target = SHIFTS[shift]
    stage, extra = METHODS[method]
    labelled = target if method == "target_supervised" else source
    epochs = 2
    argv = ["train", "--stage", stage, "--run-dir", str(run_dir), "--data.source=simulate",
            f"--schedule.epochs={epochs}", f"--schedule.batches_per_epoch={args.batches // epochs}",
            f"--seed={args.seed}", "--data.target.source=simulate",
            *simulator_args("data.simulator", labelled, args.eval_per_class),
            *simulator_args("data.target.simulator", target, args.eval_per_class), *TRAIN, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dlscale.cli", *argv], check=True, env=env, stdout=sys.stderr)
    seconds = time.perf_counter() - start
    timing.write_text(f"{seconds:.1f}\n")
    return seconds


def study(shift: str, args, work: Path) -> dict:
    from dlscale.metrics import gap_closed
    seconds = {m: run_method(shift, m, args, work / shift / m) for m in METHODS}
    scores = {m: np.load(work / shift / m / "scores_target_val.npz") for m in METHODS}
    ids = scores["source_only"]["ids"]
    for m, s in scores.items():   # the same target images, in the same order, for every method
        if not np.array_equal(s["ids"], ids):
            raise RuntimeError(f"{shift}/{m}: scored other target images than source_only")
    closed = gap_closed({m: s["probs"] for m, s in scores.items()}, scores["source_only"]["labels"],
                        "source_only", "target_supervised", seed=args.seed)
    rows = {}
    for m in METHODS:
        metrics = json.loads((work / shift / m / "metrics.json").read_text())
        rows[m] = {**closed[m], "target_accuracy": metrics["target/val/accuracy"],
                   "target_probe_auc_macro": metrics.get("target/probe/auc_macro"),
                   "source_auc_macro": metrics["val/auc_macro"], "seconds": round(seconds[m], 1)}
    goal = any(rows[m]["gap_closed"] >= 0.5 and rows[m]["gain_over_baseline_ci_low"] > 0 for m in ADAPTED)
    return {"methods": rows, "gap": closed["gap"], "half_the_gap_closed_ci_apart": bool(goal)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shifts", default=",".join(SHIFTS))
    p.add_argument("--batches", type=int, default=600, help="training batches of 32 per method")
    p.add_argument("--eval-per-class", type=int, default=500, help="target (and source) evaluation images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_adapt"))
    args = p.parse_args()
    shifts = args.shifts.split(",")
    unknown = sorted(set(shifts) - set(SHIFTS))
    if unknown:
        p.error(f"unknown shifts {unknown}: expected some of {', '.join(SHIFTS)}")
    load = os.getloadavg()[0]
    results = {s: study(s, args, args.work_dir) for s in shifts}
    print(json.dumps({"bench": "adapt", "batches": args.batches, "batch_size": 32,
                      "eval_per_class": args.eval_per_class, "load_average_start": load,
                      "load_average_end": os.getloadavg()[0], "shifts": results}, indent=2))


if __name__ == "__main__":
    main()
