"""The encoder as a foundation: label-efficiency curves on simulated Model II (64x64) with `dlscale transfer`.

    python bench/foundation.py [--n-per-class 2000] [--labels 10,100,1000] [--repeats 2] [--ssl-stage auto]
                               [--work-dir runs/bench_foundation]                                 # prints JSON

Steps, each a `dlscale` command (finished steps in --work-dir are reused):
  1. `dlscale simulate --preset model_ii --n-per-class N --splits train=0.8,val=0.2`
  2. pre-training of the small CNN (width 16) on the train split, labels unused: the autoencoder, and the
     self-supervised stage (`--ssl-stage auto`: contrastive (SimCLR) if the stage exists, else mae, else none),
     on every local rank through torchrun as the quickstart trains;
  3. `dlscale transfer` of both encoders: probe, fine-tune, scratch and the random-init control at each N.
Reported: mean macro AUC / accuracy and their 95% CI (two-level bootstrap, see dlscale.transfer.scoring) per cell,
the wall time of each step and the machine load. The goal: pretrained encoders above scratch at N = 10 and 100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SMALL_CNN = ["--model.encoder.name=small", "--model.encoder.width=16", "--data.batch_size=32",
             "--data.num_workers=0", "--optim.lr=3e-3", "--optim.warmup_steps=20", "--eval.probe_samples=2000",
             "--eval.n_bootstrap=50", "--schedule.log_every=50", "--schedule.checkpoint_every=0"]
FINE_TUNE = ["--data.batch_size=32", "--data.num_workers=0", "--optim.lr=1e-3", "--schedule.log_every=50"]


def dlscale(*argv: str) -> None:
    """One `dlscale` command in a child process (its output goes to our stderr, stdout is the JSON); a failure
    stops the benchmark."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "dlscale.cli", *argv], check=True, env=env, stdout=sys.stderr)


def train(stage: str, data: Path, run_dir: Path, ranks: int, epochs: int) -> None:
    args = ["--stage", stage, "--data", str(data), "--run-dir", str(run_dir), f"--schedule.epochs={epochs}",
            *SMALL_CNN]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    subprocess.run([*launcher, "-m", "dlscale.train", *args], check=True, env=env, stdout=sys.stderr)


def ssl_stage(requested: str) -> str | None:
    from dlscale.train.stages import STAGES
    if requested == "none":
        return None
    if requested != "auto":
        if requested not in STAGES:
            raise SystemExit(f"--ssl-stage {requested}: not a registered stage ({', '.join(STAGES)})")
        return requested
    return next((s for s in ("contrastive", "mae") if s in STAGES), None)


def timed(timings: dict, name: str, done: bool, step) -> None:
    if done:
        timings[name] = "reused"
        return
    start = time.perf_counter()
    step()
    timings[name] = round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_foundation"))
    p.add_argument("--n-per-class", type=int, default=2000)
    p.add_argument("--labels", default="10,100,1000", help="labels per class of the curve")
    p.add_argument("--repeats", type=int, default=2, help="label subsets per N")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5, help="fine-tune / scratch epochs")
    p.add_argument("--ssl-stage", default="auto", help="auto | contrastive | mae | none")
    p.add_argument("--ranks", type=int, default=None, help="training ranks (default: the quickstart's choice)")
    a = p.parse_args(argv)
    from dlscale.distributed import local_ranks
    ranks = a.ranks or local_ranks()
    work, timings = a.work_dir, {}
    data, ae, out = work / "data", work / "autoencoder", work / "transfer"
    timed(timings, "simulate_s", (data / "manifest.json").is_file(), lambda: dlscale(
        "simulate", "--preset", "model_ii", "--n-per-class", str(a.n_per_class), "--out", str(data), "--splits",
        "train=0.8,val=0.2", "--seed", "0", "--batch-size", "32"))
    timed(timings, "pretrain_autoencoder_s", (ae / "encoder.pt").is_file(),
          lambda: train("autoencoder", data, ae, ranks, a.pretrain_epochs))
    encoders = [ae]
    stage = ssl_stage(a.ssl_stage)
    if stage:
        ssl = work / stage
        timed(timings, f"pretrain_{stage}_s", (ssl / "encoder.pt").is_file(),
              lambda: train(stage, data, ssl, ranks, a.pretrain_epochs))
        encoders.append(ssl)
    timed(timings, "transfer_s", False, lambda: dlscale(
        "transfer", *(x for e in encoders for x in ("--encoder", str(e))), "--data", str(data), "--out", str(out),
        "--labels-per-class", a.labels, "--repeats", str(a.repeats), "--epochs", str(a.epochs),
        "--ranks", str(ranks), *FINE_TUNE))
    results = json.loads((out / "results.json").read_text())
    table = [{"n_per_class": c["n_per_class"], "method": c["method"], "model": c["model"],
              "repeats": len(c["repeats"]), **{f"{k}": round(c["mean"][k], 4) for k in ("accuracy", "auc_macro")},
              "auc_macro_ci": [round(c["ci_low"]["auc_macro"], 4), round(c["ci_high"]["auc_macro"], 4)]}
             for c in results["cells"]]
    print(json.dumps({"benchmark": "foundation", "data": f"model_ii {a.n_per_class}/class 64x64",
                      "ssl_stage": stage, "ranks": ranks, "pretrain_epochs": a.pretrain_epochs,
                      "epochs": a.epochs, "timings": timings, "load_average": os.getloadavg(),
                      "report": str(out / "report.md"), "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
