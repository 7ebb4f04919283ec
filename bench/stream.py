"""Streaming speed: the training stream from local shards with 0 / 1 / 2 / 4 DataLoader workers, fed to a no-op
consumer (the loader alone) and to a training step, vs the same images from memory; `dlscale pack` files/s.

    python bench/stream.py [--samples 40000] [--batch-size 64] [--rounds 2] [--workers 0,1,2,4]   # prints JSON
    python bench/stream.py --quick     # the two goal ratios only (~2 min on an idle 2-core machine)

Each figure is the best of `--rounds` interleaved rounds (the machine is shared: a round that another job slowed
down is not the loader's speed). `1x<size>x<size>.noop.workers_<W>` is samples/s with nothing done per batch;
`.step.workers_<W>` samples/s of a plain-PyTorch training step of the small CNN (width 16) fed by the stream, with its
data-wait fraction (time in `next(loader)` / wall time). `workers_0` reads in the training process.
`noop_per_sample`: CPU time (us, user and system) and minor page faults per sample of the training process
(`main_*`) and of its DataLoader workers together (`workers_*`) with the no-op consumer, after the warm-up, in the
fastest round; unlike samples/s, they hardly move with the machine's load; `spilled`: the fraction of the rows that
waited in spill rows. These figures are a stream's first epoch, whose fresh workers map the batch ring before their
first record (in the warm-up); `noop_kept` / `noop_kept_per_sample` (and the ratios `..._kept`) are its second epoch,
read by the workers the stream kept from the first, as a run's later epochs are.

Goals: `ratio_2_workers_vs_1_150px_noop` (2 DataLoader workers vs 1, 1x150x150, no-op consumer) >= 1.6 on 2 cores
(ideal 2); `ratio_stream_vs_memory_64px` (the best worker count vs an in-memory DataLoader, 1x64x64, no-op) >= 0.8.
Pack speed is measured through the CLI (start-up included).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
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
from dlscale.data.stream import train_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.models import EncoderConfig, build_encoder

WARMUP_BATCHES = 3    # worker start-up and the shuffle buffer's first fill


def write_dataset(out: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    with DatasetWriter(out, (1, size, size), {"kind": "bench"}, shard_size=4096) as w:
        for start in range(0, n, 1024):
            m = min(1024, n - start)
            w.add_batch("train", rng.random((m, 1, size, size), dtype=np.float32), rng.integers(0, 3, m),
                        [{"i": start + i} for i in range(m)])


def usage() -> tuple[float, float, float, float]:
    """CPU seconds (user and system) and minor page faults so far of this process and of its live child processes
    together (the DataLoader workers; Linux /proc). A worker's CPU time is the nanosecond count of each of its
    threads' `schedstat`: `stat`'s, in clock ticks of 10 ms, moved a 10,000-sample figure by 1 us a sample."""
    mine, workers = resource.getrusage(resource.RUSAGE_SELF), [0.0, 0.0]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid():
                workers[0] += sum(int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
                                  for task in os.listdir(f"/proc/{pid}/task")) / 1e9
                workers[1] += int(fields[7])
        except OSError:
            continue
    return mine.ru_utime + mine.ru_stime, workers[0], mine.ru_minflt, workers[1]


def rate(loader, consume=None, batches_total: int | None = None) -> tuple[float, float, dict]:
    """(samples/s after the warm-up batches, fraction of that time spent waiting for the loader, CPU us and minor
    page faults per sample of this process and of the workers over that time: measured up to the `batches_total`-th
    batch, before the workers exit; empty without it)."""
    seen, waited, t0, cpu = 0, 0.0, None, {}
    batches = iter(loader)
    for i in itertools.count():
        asked = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        images, labels = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        if t0 is None and seen >= WARMUP_BATCHES * len(labels):
            t0, seen, waited, used = time.perf_counter(), 0, 0.0, usage()
        elif t0 is not None:
            waited += time.perf_counter() - asked
        seen += len(labels)
        if t0 is not None and i + 1 == batches_total:
            names, scales = ("main_cpu_us", "workers_cpu_us", "main_faults", "workers_faults"), (1e6, 1e6, 1, 1)
            cpu = {k: round(x * (b - a) / seen, 1) for k, x, a, b in zip(names, scales, used, usage())}
        if consume is not None:
            consume(images, labels)
    wall = time.perf_counter() - t0
    return seen / wall, waited / wall, cpu


def training_step(size: int):
    """A plain-PyTorch supervised step of the small CNN (fresh per measurement, so every one does the same work)."""
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="small", width=16), (1, size, size))
    model = torch.nn.Sequential(encoder, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(encoder.out_channels, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(images, labels):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def stream_rate(data: Path, workers: int, batch: int, samples: int, consume=None, epoch: int = 0) -> tuple[float, float,
                                                                                                          dict]:
    """`rate` of the training stream in its epoch `epoch` (the epochs before it read first, unmeasured, by the same
    DataLoader workers: the stream keeps them); its per-sample figures add `spilled`, the fraction of the rows that
    went through the batch ring's spill rows."""
    cfg = StreamConfig(batch_size=batch, num_workers=workers, augment=True)
    loader = train_loader(data, cfg, batches=samples // batch)
    for e in range(epoch):
        loader.dataset.set_epoch(e)
        for _ in loader:
            pass
    loader.dataset.set_epoch(epoch)
    samples_per_s, waited, per_sample = rate(loader, consume, samples // batch)
    plan = loader.dataset.cuts
    del loader
    gc.collect()   # the stream's batch ring (GBs at 1x150x150) lives in reference cycles: one ring at a time, not ~6
    return samples_per_s, waited, {**per_sample, "spilled": round(plan.spilled / plan.taken, 3)} if per_sample else {}


def memory_loader(n: int, size: int, batch: int) -> DataLoader:
    ds = TensorDataset(torch.rand(n, 1, size, size), torch.randint(0, 3, (n,)))
    return DataLoader(ds, batch_size=batch, shuffle=True)


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


def measure_size(data: Path, size: int, n: int, a) -> dict:
    best: dict[str, tuple[float, float, dict]] = {}

    def keep(key: str, figure: tuple[float, float, dict]) -> None:
        if key not in best or figure[0] > best[key][0]:
            best[key] = figure
    for _ in range(a.rounds):
        keep("memory_dataloader", rate(memory_loader(n, size, a.batch_size)))
        for w in a.workers:
            keep(f"noop.workers_{w}", stream_rate(data, w, a.batch_size, n))
        for w in a.workers if a.kept else ():
            if w:
                keep(f"noop_kept.workers_{w}", stream_rate(data, w, a.batch_size, n, epoch=1))
        for w in a.workers if a.step_samples else ():
            keep(f"step.workers_{w}", stream_rate(data, w, a.batch_size, a.step_samples, training_step(size)))
    out: dict = {"samples": n, "memory_dataloader": round(best["memory_dataloader"][0])}
    for kind in ("noop", "noop_kept", "step"):
        out[kind] = {key.split(".")[1]: round(best[key][0]) for key in best if key.startswith(kind + ".")}
        if kind != "step":
            out[kind + "_per_sample"] = {key.split(".")[1]: best[key][2] for key in best if key.startswith(kind + ".")}
    out["step_data_wait_fraction"] = {key.split(".")[1]: round(best[key][1], 3) for key in best
                                      if key.startswith("step")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=40000, help="per measurement at 1x64x64 (a quarter at 150x150)")
    p.add_argument("--step-samples", type=int, default=3200, help="per measurement with the training step (0: skip)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", default="0,1,2,4", help="DataLoader worker counts")
    p.add_argument("--pack-files", type=int, default=1000, help="files per class for the pack benchmark (0: skip)")
    p.add_argument("--no-kept", dest="kept", action="store_false", help="skip the second epochs (`noop_kept`: the "
                   "DataLoader workers kept from the first epoch, as a run's later epochs read)")
    p.add_argument("--quick", action="store_true", help="only what the goal ratios need: workers 0,1,2 with the "
                   "no-op consumer (first and second epochs) and the in-memory loader, 3 rounds; no training step, "
                   "no pack")
    a = p.parse_args(argv)
    if a.quick:
        a.workers, a.step_samples, a.pack_files, a.rounds = "0,1,2", 0, 0, 3
    a.workers = [int(w) for w in a.workers.split(",")]
    torch.set_num_threads(1)
    results: dict = {"batch_size": a.batch_size, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size, n in ((64, a.samples), (150, a.samples // 4)):
            data = tmp / f"set{size}"
            write_dataset(data, n, size)
            results[f"1x{size}x{size}"] = measure_size(data, size, n, a)
        if a.pack_files:
            results["pack_files_per_s"] = {f"workers_{w}": round(pack_rate(tmp, a.pack_files, w)) for w in (1, 2)}
    small, large = results["1x64x64"], results["1x150x150"]
    if {1, 2} <= set(a.workers):
        results["ratio_2_workers_vs_1_150px_noop"] = round(large["noop"]["workers_2"] / large["noop"]["workers_1"], 3)
    results["ratio_stream_vs_memory_64px"] = round(max(small["noop"].values()) / small["memory_dataloader"], 3)
    if a.kept:   # a run's epochs after its first: 0 workers as before, the others kept from the first epoch
        best_kept = max([*small["noop_kept"].values(), small["noop"].get("workers_0", 0)])
        results["ratio_stream_vs_memory_64px_kept"] = round(best_kept / small["memory_dataloader"], 3)
        if {1, 2} <= set(a.workers):
            results["ratio_2_workers_vs_1_150px_noop_kept"] = round(large["noop_kept"]["workers_2"] /
                                                                    large["noop_kept"]["workers_1"], 3)
    results["load_after"] = os.getloadavg()[0]
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
