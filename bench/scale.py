"""Cost vs size of a simulation set: Model II images simulated into shards with `dlscale simulate --workers 2`, then
one training-stream epoch and one exact eval pass over the set; wall time per sample, peak RSS, manifest load time.

    python bench/scale.py [--sizes 10000 100000 1000000] [--budget-s 1800] [--work-dir DIR]    # prints JSON

Each phase runs in its own child process, so its peak RSS is its own: `rss_main_mb` is the phase's main process
(`dlscale simulate` itself, or the process iterating the DataLoader; `rss_main_after_imports_mb` is what its imports
alone hold), `rss_worker_mb` its largest worker (simulate pool process or DataLoader worker). The train epoch is
`batches_per_epoch` batches of `--batch-size` from 2 workers (shuffle buffer 4096, normalise + augment); the eval
pass reads every split once (EvalStream, 2 workers) and checks that it saw exactly the manifest's sample count. Data
only, no model. The set was just written, so reads come mostly from the page cache. A size is skipped, with the
reason, when the disk cannot hold ~1.25x its estimated size or its estimated time (from the previous size's
per-sample cost) would overrun `--budget-s`; each set is deleted after use.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FIRST_BYTES_PER_SAMPLE = 20_000      # estimate before anything is measured (64x64 float32 + metadata + tar)


def peak_rss_mb() -> dict:
    mb = lambda who: round(resource.getrusage(who).ru_maxrss / 1024, 1)   # noqa: E731  (Linux: kB)
    return {"rss_main_mb": mb(resource.RUSAGE_SELF), "rss_worker_mb": mb(resource.RUSAGE_CHILDREN)}


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def phase(name: str, data: Path, n: int, batch_size: int, workers: int) -> dict:
    """One phase in this (child) process; returns its wall time, samples and peak RSS."""
    import torch
    torch.set_num_threads(1)
    from dlscale.cli import main as cli
    from dlscale.data.shards import load_manifest
    from dlscale.data.stream import batches_per_epoch, eval_loader, train_loader
    from dlscale.data.stream_config import StreamConfig
    imported = current_rss_mb()   # what the imports alone hold, for scale
    start = time.perf_counter()
    if name == "simulate":
        code = cli(["simulate", "--preset", "model_ii", "--n-per-class", str(n // 3), "--out", str(data),
                    "--workers", str(workers), "--splits", "train=0.9,val=0.1"])
        if code:
            raise SystemExit(f"dlscale simulate exited with {code}")
        samples = sum(s["samples"] for s in load_manifest(data)["splits"].values())
    elif name == "train_epoch":
        cfg = StreamConfig(batch_size=batch_size, num_workers=workers)
        train = load_manifest(data)["splits"]["train"]["samples"]
        samples = sum(len(b["label"]) for b in train_loader(data, cfg, batches=batches_per_epoch(train, batch_size, 1)))
    else:
        cfg = StreamConfig(batch_size=batch_size, num_workers=workers)
        manifest, samples = load_manifest(data), 0
        for split, info in manifest["splits"].items():
            seen = sum(len(b["label"]) for b in eval_loader(data, cfg, split=split))
            if seen != info["samples"]:
                raise SystemExit(f"eval pass over {split}: {seen} samples, manifest says {info['samples']}")
            samples += seen
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "samples": samples, "us_per_sample": round(1e6 * wall / samples, 1),
            "rss_main_after_imports_mb": imported, **peak_rss_mb()}


def run_phase(name: str, data: Path, n: int, a: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--data", str(data), "--n", str(n),
                          "--batch-size", str(a.batch_size), "--workers", str(a.workers)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"phase {name} at {n}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def manifest_load_ms(data: Path) -> float:
    from dlscale.data.shards import load_manifest
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        load_manifest(data)
        times.append(time.perf_counter() - t0)
    return round(1e3 * min(times), 2)


def measure(n: int, work: Path, a: argparse.Namespace) -> dict:
    data = work / f"model_ii_{n}"
    try:
        row = {"simulate": run_phase("simulate", data, n, a)}
        files = list(data.iterdir())
        size = sum(f.stat().st_size for f in files)
        row.update(images=row["simulate"]["samples"], shards=len(files) - 1, dataset_gb=round(size / 1e9, 3),
                   bytes_per_sample=round(size / row["simulate"]["samples"]),
                   manifest_kb=round((data / "manifest.json").stat().st_size / 1e3, 1),
                   manifest_load_ms=manifest_load_ms(data))
        row["train_epoch"] = run_phase("train_epoch", data, n, a)
        row["eval_pass"] = run_phase("eval_pass", data, n, a)
        return row
    finally:
        shutil.rmtree(data, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+", default=[10 ** 4, 10 ** 5, 10 ** 6])
    p.add_argument("--budget-s", type=float, default=1800.0, help="skip a size whose estimated time overruns this")
    p.add_argument("--work-dir", type=Path, help="where the sets are written (default: a temporary directory)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="simulate workers and DataLoader workers")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--phase", choices=["simulate", "train_epoch", "eval_pass"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase:
        print(json.dumps(phase(a.phase, a.data, a.n, a.batch_size, a.workers)))
        return 0
    started = time.perf_counter()
    results: dict = {"preset": "model_ii", "batch_size": a.batch_size, "workers": a.workers, "cpus": os.cpu_count(),
                     "loadavg_start": os.getloadavg(), "sizes": {}, "skipped": {}}
    bytes_per_sample, s_per_sample = FIRST_BYTES_PER_SAMPLE, None
    with tempfile.TemporaryDirectory(dir=a.work_dir) as tmp:
        for n in sorted(a.sizes):
            need, free = 1.25 * n * bytes_per_sample, shutil.disk_usage(tmp).free
            left = a.budget_s - (time.perf_counter() - started)
            reason = None
            if need > free:
                reason = f"needs ~{need / 1e9:.1f} GB on {tmp}, {free / 1e9:.1f} GB free"
            elif s_per_sample is not None and n * s_per_sample > left:
                reason = f"estimated {n * s_per_sample:.0f} s, {left:.0f} s of --budget-s left"
            if reason:
                print(f"skipped {n} images: {reason}", file=sys.stderr)
                results["skipped"][str(n)] = reason
                continue
            t0 = time.perf_counter()
            row = measure(n, Path(tmp), a)
            results["sizes"][str(n)] = row
            bytes_per_sample, s_per_sample = row["bytes_per_sample"], (time.perf_counter() - t0) / n
            print(f"{n} images: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    results["loadavg_end"] = os.getloadavg()
    text = json.dumps(results, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
