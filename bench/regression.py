"""The pretrained encoder downstream: log10 axion mass regression (MAE in dex) and anomaly detection (AUROC no_sub
against cdm + axion), at 1,000 labelled images per class and with all labels, against the goals.

    python bench/regression.py [--encoder runs/quickstart/pretrain] [--work-dir runs/bench_regression]
                               [--n-per-class 12000] [--epochs 20] [--min-steps 6000,27000] [--ranks 2]
                               [--pretrain-epochs 3] [--tasks regression,anomaly] [--ema 0]  # prints JSON

1. data: a simulated Model II set (`dlscale simulate --preset model_ii`: 64x64, noiseless, SIE + shear fixed, the
   axion mass log-uniform in 1e-24 - 1e-22 eV, so its vortex line is 0.06 - 6 arcsec long, 0.6 - 60 pixels of
   0.101"), `--n-per-class` images per class, 80% train / 20% val.
2. encoder: `--encoder` (e.g. the demo's, `make demo` -> runs/quickstart/pretrain: the small CNN pretrained by
   reconstruction + SimCLR from the Model II simulation stream, no labels); without it, bench/transfer_methods.py's
   recipe (the same CNN and objectives) pretrains `--pretrain-epochs` epochs on the train split's images.
3. two studies, `dlscale transfer --tasks regression,anomaly --methods probe,finetune` (`--methods` adds lpft,
   scratch, ... at their cost: each trained method is one run per subset of the same step budget): at 1,000
   labels per class (1,000 axion images for the mass; 3 label subsets) and at all labels (one run per method). Every
   trained run: `--epochs` x max(20, N_train / (32 x ranks), min_steps / epochs) batches of 32 per rank at lr 3e-3
   (warm-up a tenth, cosine decay), `--min-steps` the step floor of each study (`budget.min_steps`: 1,000 images
   are only 15 batches an epoch on 2 ranks); the regression recipe of `dlscale transfer`'s defaults: the MSE loss on
   the standardised target, predictions averaged over the 8 dihedral views of each image, BatchNorm statistics
   re-estimated on the training images after the last step, then the head refitted by least absolute deviations to
   the view-averaged features of the training images (`task_options.regression` .loss / .tta / .precise_bn /
   .refit_head);
   `--ema` the decay of the moving average of the weights the trained runs export (`task_options.regression.ema`);
   scratch is the same architecture from random weights. MAE and R^2 on the val split's axion
   images, AUROC on the whole val split, 95% CIs of the two-level bootstrap (1000 draws).
Finished steps in WORK are reused. The JSON holds each cell's mean and CI, the goals met or not, the wall seconds
and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from transfer_methods import PRETRAIN, step   # this folder: `python bench/regression.py` puts it first on the path

MASS = "mae/log10_axion_mass"
GOALS = {"1000": (MASS, 0.10), "all": (MASS, 0.05)}   # labels per class -> (metric, largest MAE in dex)
ANOMALY_GOAL = 0.93


def goal_lines(cells: list[dict]) -> list[str]:
    """Each goal met or not by the measured cell (the best method's), with its CI."""
    lines = []
    for n, (metric, bound) in GOALS.items():
        scored = [c for c in cells
                  if c["task"] == "regression" and str(c["n_per_class"]) == n and metric in c["mean"]]
        if not scored:
            lines.append(f"{metric} <= {bound} at {n} labels per class: not measured")
            continue
        best = min(scored, key=lambda c: c["mean"][metric])
        verdict = "met" if best["mean"][metric] <= bound else "NOT met"
        lines.append(f"{metric} <= {bound} at {n} labels per class: {verdict} by {best['method']}: "
                     f"{best['mean'][metric]:.3f} ({best['ci_low'][metric]:.3f}-"
                     f"{best['ci_high'][metric]:.3f})")
    anomaly = [(c, k) for c in cells if c["task"] == "anomaly" for k in c["mean"] if k.endswith("/both")]
    if anomaly:
        cell, key = max(anomaly, key=lambda ck: ck[0]["mean"][ck[1]])
        value = cell["mean"][key]
        lines.append(f"AUROC no_sub vs cdm + axion >= {ANOMALY_GOAL}: {'met' if value >= ANOMALY_GOAL else 'NOT met'} "
                     f"by {key} ({cell['method']}, {cell['n_per_class']} per class): {value:.3f} "
                     f"({cell['ci_low'][key]:.3f}-{cell['ci_high'][key]:.3f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", type=Path, help="a pretrained encoder (default: pretrain one in WORK/pretrain)")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_regression"))
    p.add_argument("--n-per-class", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--min-steps", default="6000,27000",
                   help="each trained run's step floor in the study at 1,000 labels per class and in the one at all")
    p.add_argument("--methods", default="probe,finetune")
    p.add_argument("--tasks", default="regression,anomaly")
    p.add_argument("--studies", default="1000,all", help="which of the two studies to run (finished runs are reused)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of the weight average the trained regression runs export (0: their last weights)")
    args = p.parse_args(argv)
    min_steps = dict(zip(("1000", "all"), (int(n) for n in args.min_steps.split(",")), strict=True))
    work, seconds = args.work_dir, {}
    data = work / "data"
    if not (data / "manifest.json").is_file():
        seconds["simulate"] = step(["simulate", "--preset", "model_ii", "--n-per-class", str(args.n_per_class),
                                    "--out", str(data), "--splits", "train=0.8,val=0.2", "--seed", "0"])
    encoder = args.encoder or work / "pretrain"
    if args.encoder is None and not (encoder / "encoder.pt").is_file():
        seconds["pretrain"] = step(["train", "--data", str(data), "--run-dir", str(encoder), *PRETRAIN,
                                    f"--schedule.epochs={args.pretrain_epochs}", "--eval.probe_samples=3000"])
    cells = []
    for labels, repeats in [(n, r) for n, r in (("1000", 3), ("all", 1)) if n in args.studies.split(",")]:
        out = work / f"study-{labels}"
        seconds[f"study-{labels}"] = step([
            "transfer", "--encoder", str(encoder), "--data", str(data), "--out", str(out), "--tasks",
            args.tasks, "--task_options.regression.targets=[log10_axion_mass]", "--methods", args.methods,
            "--labels-per-class", labels, "--repeats", str(repeats), "--ranks", str(args.ranks), "--n-bootstrap",
            "1000", f"--budget.epochs={args.epochs}", f"--budget.min_steps={min_steps[labels]}",
            "--budget.min_batches_per_epoch=20", "--data.batch_size=32",
            "--data.num_workers=0", "--optim.lr=3e-3", "--deepspeed.zero_stage=0",
            f"--task_options.regression.ema={args.ema}"])
        results = json.loads((out / "results.json").read_text())
        keys = ("task", "method", "model", "n_per_class", "n_train", "mean", "ci_low", "ci_high")
        cells += [{k: c[k] for k in keys} for c in results["cells"]]
    recipe = {"epochs": args.epochs, "min_steps": min_steps, "ranks": args.ranks, "batch_per_rank": 32, "lr": 3e-3,
              "methods": args.methods, "tasks": args.tasks, "ema": args.ema}
    print(json.dumps({"encoder": str(encoder), "recipe": recipe, "cells": cells, "goals": goal_lines(cells),
                      "seconds": seconds, "load_average": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
