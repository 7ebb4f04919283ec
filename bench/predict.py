"""`dlscale predict` speed: images/s on a shard split and on the same images as .npy files, against `dlscale eval`
on the same split, for one finished run.

    python bench/predict.py [--images 3000] [--side 64] [--workers 2] [--batch-size 64]   # prints JSON

A small multitask run (small CNN, recon + classification) is trained first (a few steps: speed does not depend on
the weights). Each command runs as its own process, like a user's (start-up, model load and output writing
included: `wall_s`); `predict_steady_images_per_s` times the library call alone in this process (no interpreter
start-up). Goal: predict at least as fast as `dlscale eval` on the same split (eval also reads the probe's train
features, fits the probe and draws figures), i.e. `ratio_predict_over_eval` >= 1.
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np

from dlscale.data.classes import CLASSES
from dlscale.data.shards import DatasetWriter

ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}


def separable(rng: np.random.Generator, label: int, side: int) -> np.ndarray:
    x = rng.random((1, side, side), dtype=np.float32) * 0.2
    half = side * (label + 1) // 8
    x[:, side // 2 - half:side // 2 + half, side // 2 - half:side // 2 + half] += 1.0
    return x


def write_data(root: Path, images: int, side: int) -> tuple[Path, Path]:
    """A shard dataset (train 600, val `images`) and the val images again as .npy files."""
    rng = np.random.default_rng(0)
    data, files = root / "data", root / "npy"
    files.mkdir()
    with DatasetWriter(data, (1, side, side), {"kind": "bench"}, shard_size=512, samples_per_record=64) as w:
        for split, n in (("train", 600), ("val", images)):
            for i in range(n):
                img = separable(rng, i % 3, side)
                w.add(split, img, i % 3, {"class": CLASSES[i % 3], "source_file": f"{split}/{i}"})
                if split == "val":
                    np.save(files / f"{i:06d}.npy", img[0])
    return data, files


def dlscale(*args) -> float:
    """Wall seconds of one `dlscale` command in its own process (fails loudly)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dlscale.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"dlscale {' '.join(map(str, args[:2]))} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def steady_rate(run: Path, data: Path, out: Path, workers: int, batch: int) -> float:
    """images/s of the library call alone (model loaded, no process start-up)."""
    from dlscale.distributed import DistInfo
    from dlscale.predict import PredictConfig, predict
    cfg = PredictConfig(run, str(data), out, "val", batch_size=batch, num_workers=workers, progress=False)
    t0 = time.perf_counter()
    result, _ = predict(cfg, DistInfo(0, 1, 0))
    return len(result.sources) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000, help="val images scored")
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, files = write_data(root, a.images, a.side)
        run = root / "run"
        dlscale("train", "--stage", "multitask", "--data", data, "--run-dir", run, "--model.encoder.name=small",
                "--data.num_workers=0", "--schedule.epochs=1", "--schedule.batches_per_epoch=3",
                f"--data.batch_size={a.batch_size}", "--eval.n_bootstrap=20", "--eval.probe_samples=256")
        common = ["--batch-size", a.batch_size, "--workers", a.workers, "--no-progress"]
        eval_s = dlscale("eval", "--run-dir", run, "--split", "val")
        shards_s = dlscale("predict", "--run", run, "--data", data, "--split", "val", "--out", root / "p1", *common)
        files_s = dlscale("predict", "--run", run, "--data", files, "--out", root / "p2", *common)
        steady = steady_rate(run, data, root / "p3", a.workers, a.batch_size)
    n = a.images
    result = {"settings": {"images": n, "image_shape": [1, a.side, a.side], "encoder": "small (width 32)",
                           "tasks": "recon+classification", "workers": a.workers, "batch_size": a.batch_size,
                           "device": "cpu", "threads": ENV["OMP_NUM_THREADS"]},
              "eval": {"wall_s": round(eval_s, 2), "images_per_s": round(n / eval_s, 1)},
              "predict_shards": {"wall_s": round(shards_s, 2), "images_per_s": round(n / shards_s, 1)},
              "predict_npy_files": {"wall_s": round(files_s, 2), "images_per_s": round(n / files_s, 1)},
              "predict_steady_images_per_s": round(steady, 1),
              "ratio_predict_over_eval": round(eval_s / shards_s, 2),
              "load_average": os.getloadavg()}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
