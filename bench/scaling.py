"""Data-parallel scaling on this machine: training samples/s with 1 vs 2 ranks (torchrun, gloo on CPU).

    python bench/scaling.py [--encoder small] [--batches 60]     # prints JSON

Same per-rank micro batch and batches per rank; throughput is the engine's own `throughput/samples_per_s`
(training time only, start-up and evaluation excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dlscale.data.shards import DatasetWriter

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(out: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    with DatasetWriter(out, (1, size, size), {"kind": "bench"}, shard_size=512) as w:
        for split, count in (("train", n), ("val", n // 8)):
            labels = rng.integers(0, 3, count)
            w.add_batch(split, rng.random((count, 1, size, size), dtype=np.float32), labels,
                        [{} for _ in range(count)])


def throughput(data: Path, run: Path, ranks: int, a) -> float:
    env = {**os.environ, "DS_ACCELERATOR": "cpu" if a.device == "cpu" else os.environ.get("DS_ACCELERATOR", ""),
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "launch" / "train.py"), "--stage", "supervised", "--data", str(data), "--run-dir", str(run),
           f"--model.encoder.name={a.encoder}", f"--data.batch_size={a.batch_size}", "--data.num_workers=1",
           "--schedule.epochs=1", f"--schedule.batches_per_epoch={a.batches}", "--eval.probe_samples=0",
           "--eval.n_bootstrap=0", f"--device={a.device}"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run / "metrics.json").read_text())["throughput/samples_per_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="small")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, max(a.ranks) * a.batches * a.batch_size, 64)
        rates = {r: throughput(data, Path(tmp) / f"run{r}", r, a) for r in a.ranks}
    base = rates[min(rates)]
    result = {"device": a.device, "encoder": a.encoder, "micro_batch": a.batch_size,
              "samples_per_s": {f"{r}_ranks": round(v, 1) for r, v in rates.items()},
              "speedup_vs_1_rank": {f"{r}_ranks": round(v / base, 3) for r, v in rates.items()}}
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
