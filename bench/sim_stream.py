"""Training from the simulator vs from shards: samples/s per CPU worker, and the data-wait fraction of a training loop.

    python bench/sim_stream.py [--seconds 8] [--batch-size 64] [--steps 40]     # prints JSON

stream_samples_per_s: `SimulationStream` batches (simulate + normalise + augment) through a DataLoader with one worker
process of one torch thread, per preset at its own image size (Model I 150x150 with noise, Models II/III 64x64
noiseless), against the shard `TrainStream` over a small Model II set made by `dlscale simulate` beforehand.
data_wait: a plain torch loop (the small CNN encoder of dlscale.models + a linear classifier, Adam, fp32, one thread)
fed by each stream with one worker; the fraction of the loop's wall time spent waiting for the next batch. On a
machine with fewer free cores than worker + trainer processes, both figures carry the other load (`loadavg`); each
samples/s figure is the best of `--repeats` interleaved rounds.
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dlscale.data.stream import train_loader
from dlscale.data.stream_config import StreamConfig  # noqa: E402
from dlscale.models import ClassifierHead, EncoderConfig, build_encoder  # noqa: E402
from dlscale.sim.stream import SimulationSourceConfig, SimulationStream, simulation_loader  # noqa: E402

PRESETS = ("model_i", "model_ii", "model_iii")
ENDLESS = 10 ** 6          # batches per epoch; every measurement stops on time or step count


def sim_loader(preset: str, batch_size: int, workers: int = 1):
    cfg = StreamConfig(batch_size=batch_size, num_workers=workers)
    return simulation_loader(SimulationStream(SimulationSourceConfig(preset=preset), cfg, 0, 1, ENDLESS, 0, "cpu"))


def shard_loader(data: Path, batch_size: int, workers: int = 1):
    return train_loader(data, StreamConfig(batch_size=batch_size, num_workers=workers), batches=ENDLESS)


def rate(loader, seconds: float) -> float:
    """Samples/s after the first 2 batches (worker start-up), over about `seconds`."""
    seen, start = 0, None
    for i, batch in enumerate(loader):
        if i == 2:
            seen, start = 0, time.perf_counter()
        seen += len(batch["label"])
        if start is not None and time.perf_counter() - start > seconds:
            break
    return seen / (time.perf_counter() - start)


def data_wait(loader, steps: int, width: int) -> dict:
    """Wall-time share of a plain training loop spent in `next(loader)` (after 3 warm-up steps)."""
    encoder = build_encoder(EncoderConfig(name="small", width=width))
    model = nn.Sequential(encoder, ClassifierHead(encoder.out_channels, 3))
    optim = torch.optim.Adam(model.parameters(), 1e-3)
    batches = iter(loader)
    waited = total = 0.0
    for step in range(steps + 3):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(batch["image"]), batch["label"])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step >= 3:
            waited, total = waited + t1 - t0, total + time.perf_counter() - t0
    return {"wait_fraction": round(waited / total, 3), "step_ms": round(1e3 * total / steps, 1)}


def simulate_shards(out: Path, n_per_class: int) -> float:
    """Pack a small Model II set with `dlscale simulate` (the CLI, as users run it); returns its wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dlscale.cli", "simulate", "--preset", "model_ii", "--n-per-class",
                    str(n_per_class), "--out", str(out), "--splits", "train=1.0"], check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="per samples/s figure")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per samples/s figure (best kept)")
    p.add_argument("--steps", type=int, default=40, help="timed training steps per data-wait figure")
    p.add_argument("--width", type=int, default=16, help="small encoder width of the training loop")
    p.add_argument("--shard-per-class", type=int, default=2000, help="images per class of the shard set")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results: dict = {"batch_size": a.batch_size, "repeats": a.repeats, "cpus": os.cpu_count(),
                     "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "model_ii"
        results["shard_set"] = {"images": 3 * a.shard_per_class,
                                "simulate_s": round(simulate_shards(shards, a.shard_per_class), 2)}
        loaders = {**{f"simulation_{preset}": lambda preset=preset: sim_loader(preset, a.batch_size)
                      for preset in PRESETS}, "shards_model_ii": lambda: shard_loader(shards, a.batch_size)}
        per_worker = {name: 0 for name in loaders}
        for _ in range(a.repeats):      # interleaved rounds, best of each: other load only ever slows one down
            for name, make in loaders.items():
                per_worker[name] = max(per_worker[name], round(rate(make(), a.seconds)))
        per_worker["shards_vs_simulation_model_ii"] = round(
            per_worker["shards_model_ii"] / per_worker["simulation_model_ii"], 2)
        results["stream_samples_per_s_1_worker"] = per_worker
        results["data_wait_small_cnn_1_worker"] = {
            "simulation_model_ii": data_wait(sim_loader("model_ii", a.batch_size), a.steps, a.width),
            "shards_model_ii": data_wait(shard_loader(shards, a.batch_size), a.steps, a.width)}
    results["loadavg_end"] = os.getloadavg()
    text = json.dumps(results, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
