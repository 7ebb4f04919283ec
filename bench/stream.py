"""Streaming speed: training stream from local shards vs the same images from memory; `dlscale pack` files/s.

    python bench/stream.py [--samples 40000] [--batch-size 64]   # prints JSON

Goal (issue 2): >= 50,000 samples/s per worker process for 1x64x64 (read + decode + normalise + batch) and >= 0.5
of the in-memory figure. Pack speed is measured through the CLI (start-up included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dlscale.data.shards import DatasetWriter
from dlscale.data.stream import StreamConfig, train_loader


def write_dataset(out: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    with DatasetWriter(out, (1, size, size), {"kind": "bench"}, shard_size=4096) as w:
        for start in range(0, n, 1024):
            m = min(1024, n - start)
            w.add_batch("train", rng.random((m, 1, size, size), dtype=np.float32), rng.integers(0, 3, m),
                        [{"i": start + i} for i in range(m)])


def rate(loader, samples: int) -> float:
    seen, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == 2:                       # skip worker start-up
            t0, seen = time.perf_counter(), 0
        seen += len(batch["label"] if isinstance(batch, dict) else batch[1])
    return seen / (time.perf_counter() - t0)


def stream_rate(data: Path, workers: int, batch: int, samples: int, augment: bool = False) -> float:
    cfg = StreamConfig(batch_size=batch, num_workers=workers, augment=augment)
    return rate(train_loader(data, cfg, batches=samples // batch), samples)


def memory_rate(n: int, size: int, batch: int, samples: int) -> float:
    ds = TensorDataset(torch.rand(n, 1, size, size), torch.randint(0, 3, (n,)))
    loader = DataLoader(ds, batch_size=batch, shuffle=True)
    out, seen, t0 = [], 0, time.perf_counter()
    while seen < samples:
        for x, y in loader:
            seen += len(y)
            if seen >= samples:
                break
    return seen / (time.perf_counter() - t0)


def pack_rate(tmp: Path, files_per_class: int, workers: int) -> float:
    src = tmp / f"model_i_{workers}"
    rng = np.random.default_rng(0)
    for name in ("no_sub", "cdm", "axion"):
        d = src / "Model_I" / name
        d.mkdir(parents=True)
        for i in range(files_per_class):
            np.save(d / f"{name}_sim_{i}.npy", rng.poisson(5.0, (150, 150)).astype(np.int64))
    t0 = time.perf_counter()   # through the CLI, as users run it (spawned readers re-import only dlscale)
    subprocess.run([sys.executable, "-m", "dlscale.cli", "pack", str(src), "--out", str(tmp / f"packed_{workers}"),
                    "--workers", str(workers)], check=True, capture_output=True)
    return 3 * files_per_class / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pack-files", type=int, default=1000, help="files per class for the pack benchmark")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {"batch_size": a.batch_size, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size, n in ((64, a.samples), (150, a.samples // 4)):
            data = tmp / f"set{size}"
            write_dataset(data, n, size)
            r = {"stream_1_worker": stream_rate(data, 0, a.batch_size, n),
                 "stream_1_worker_augmented": stream_rate(data, 0, a.batch_size, n, augment=True),
                 "stream_2_workers": stream_rate(data, 2, a.batch_size, n),
                 "memory_dataloader": memory_rate(n, size, a.batch_size, n)}
            r["ratio_1_worker_vs_memory"] = r["stream_1_worker"] / r["memory_dataloader"]
            results[f"1x{size}x{size}"] = {k: round(v, 3 if "ratio" in k else 0) for k, v in r.items()}
        results["pack_files_per_s"] = {f"workers_{w}": round(pack_rate(tmp, a.pack_files, w))
                                       for w in (1, 2)}
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
