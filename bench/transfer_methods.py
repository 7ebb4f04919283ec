"""Which way of fine-tuning a pretrained encoder pays with few labels: fine-tune, LP-FT, layer-wise decay and partial
fine-tuning against the same architecture from scratch (and the linear probe).

    python bench/transfer_methods.py [--work-dir runs/bench_transfer_methods] [--n-per-class 2000]
                                     [--labels-per-class 10,100] [--methods probe,finetune,lpft,...]
                                     [--repeats 3] [--unlabelled-tasks T:W,...]                            # prints JSON

1. data: a simulated Model II set (64x64, `--n-per-class` images per class, 60% train / 40% val), as the quickstart's.
2. pretrain: the demo's small CNN (width 24) by reconstruction + SimCLR on the train split's images (no labels),
   10 epochs of batch 32 at lr 3e-3.
3. study: `dlscale transfer --tasks classification` at `--labels-per-class`, `--repeats` label subsets (3), one
   rank, each run 10 epochs x max(20, N_train / 16) batches of 16 at lr 3e-3 (the quickstart's transfer budget);
   macro AUC and accuracy on the val split with 95% CIs of the two-level bootstrap (1000 draws).
Finished steps in WORK are reused. The JSON holds each cell's mean and CI, the wall seconds and the load average.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

PRETRAIN = ["--stage", "multitask", "--model.encoder.name=small", "--model.encoder.width=24",
            "--model.tasks=[recon, contrastive]", "--model.task_options.contrastive.method=simclr",
            "--model.task_options.contrastive.views.blur_prob=0.0",
            "--model.task_options.contrastive.views.noise_level=0.0",
            "--model.task_options.contrastive.views.flux_scale=1.5", "--loss.method=fixed",
            "--loss.fixed.weights={recon: 1000.0, contrastive: 1.0}", "--data.batch_size=32", "--data.num_workers=0",
            "--optim.lr=3e-3", "--deepspeed.zero_stage=0", "--schedule.epochs=10", "--schedule.log_every=50",
            "--eval.n_bootstrap=100"]
STUDY = ["--tasks", "classification", "--ranks", "1", "--n-bootstrap", "1000", "--budget.epochs=10",
         "--budget.min_batches_per_epoch=20", "--data.batch_size=16", "--data.num_workers=0", "--optim.lr=3e-3",
         "--deepspeed.zero_stage=0"]


def step(argv: list[str]) -> float:
    """One `dlscale` command in this process (its printed summary to stderr: stdout is the JSON); its wall
    seconds."""
    from dlscale.cli import main
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"dlscale {' '.join(argv[:3])} ... failed")
    return round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_transfer_methods"))
    p.add_argument("--n-per-class", type=int, default=2000)
    p.add_argument("--labels-per-class", default="10,100")
    p.add_argument("--methods", default="probe,finetune,lpft,layer_decay,partial,scratch")
    p.add_argument("--repeats", type=int, default=3, help="label subsets per N")
    p.add_argument("--unlabelled-tasks", help="budget.unlabelled_tasks of methods multitask, multitask_scratch as "
                   "task:weight,... (e.g. recon_unlabelled:100,selftrain:1; default: the study's)")
    args = p.parse_args(argv)
    work, seconds = args.work_dir, {}
    data, pretrain = work / "data", work / "pretrain"
    unlabelled = {t: float(w) for t, w in (pair.split(":") for pair in args.unlabelled_tasks.split(","))} \
        if args.unlabelled_tasks else {}
    study = work / "-".join([f"study-{args.labels_per_class}", *([f"r{args.repeats}"] if args.repeats != 3 else []),
                             *(f"{task}{weight:g}" for task, weight in unlabelled.items())])
    weight = [f"--budget.unlabelled_tasks={json.dumps(unlabelled)}"] if unlabelled else []
    if not (data / "manifest.json").is_file():
        seconds["simulate"] = step(["simulate", "--preset", "model_ii", "--n-per-class", str(args.n_per_class),
                                    "--out", str(data), "--splits", "train=0.6,val=0.4", "--seed", "0"])
    if not (pretrain / "encoder.pt").is_file():
        probe = int(args.n_per_class * 3 * 0.6)
        seconds["pretrain"] = step(["train", "--data", str(data), "--run-dir", str(pretrain), *PRETRAIN,
                                    f"--eval.probe_samples={probe}"])
    seconds["study"] = step(["transfer", "--encoder", str(pretrain), "--data", str(data), "--out", str(study),
                             "--labels-per-class", args.labels_per_class, "--methods", args.methods, "--repeats",
                             str(args.repeats), *STUDY, *weight])
    results = json.loads((study / "results.json").read_text())
    cells = [{k: c[k] for k in ("method", "model", "n_per_class", "n_train", "mean", "ci_low", "ci_high")}
             for c in results["cells"]]
    print(json.dumps({"cells": cells, "seconds": seconds, "load_average": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
