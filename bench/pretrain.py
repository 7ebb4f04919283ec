"""Which pretraining stage to use: training speed of every stage per backbone, and what a matched time budget of
each self-supervised stage buys in linear-probe macro AUC.

    python bench/pretrain.py [--parts throughput budget] [--budget-s 75] [--data DIR] [--out FILE]   # prints JSON

1. throughput: samples/s of every registered stage (contrastive: SimCLR and BYOL) for the small CNN, ResNet18
   (standard stem) and ViT-Tiny at 1x64x64, batch 32, one process and one torch thread, on in-memory random
   batches (labels and targets included), so only the model's step is timed. Each step is the engine's own
   (`Trainer.train_step` on a DeepSpeed engine from `make_engine`, fp32, ZeRO 1): forward, the tasks' losses,
   the weighting, its backward hook, the optimiser step.
2. budget: autoencoder, mae, contrastive-simclr and contrastive-byol (small CNN) each train for the same time
   budget on a simulated Model II set (`dlscale simulate --preset model_ii --n-per-class 1000 --splits
   train=0.8,val=0.2`, unless --data names a dataset), through the same engine step fed by the library's training
   stream (in this process: data time counts in the budget, alike for every stage). AdamW at the default lr with
   its linear warm-up and then a constant rate (no cosine: the number of steps a budget buys is not known in
   advance). Then `dlscale.metrics.linear_probe`: fit on frozen features of the train split, scored on the val
   split; the same probe of a randomly initialised encoder is the control.

Time is this process's CPU time (`time.process_time`): with one torch thread and no DataLoader workers, that is the
wall-clock time of a core of its own, so other processes on a shared machine do not change what a stage gets
(they do slow it through shared caches and memory bandwidth a little). Wall-clock figures and the load average are
recorded beside it; samples/s is per CPU second (median step).
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

from dlscale.data.classes import CLASSES
from dlscale.data.stream import eval_loader, train_loader
from dlscale.distributed import DistInfo
from dlscale.collect import collect
from dlscale.metrics import linear_probe
from dlscale.io import write_json
from dlscale.train.config import load_config
from dlscale.train.deepspeed_setup import init_distributed, make_engine, prepare_process
from dlscale.train.trainer import Trainer
from dlscale.train.model import build_run_model
from dlscale.train.stages import STAGES
from dlscale.train.tasks.contrastive import METHODS

BACKBONES = {"small": [], "resnet18": ["--model.encoder.small_input_stem=false"], "vit_tiny": []}
BUDGET_STAGES = ("autoencoder", "mae", "contrastive-simclr", "contrastive-byol")
TARGETS = ["theta_E"]


def stage_variants() -> dict[str, tuple[str, list[str]]]:
    """Every registered stage by name, contrastive once per method: {label: (stage, overrides)}."""
    out = {}
    for stage in STAGES:
        if stage == "contrastive":
            out.update({f"contrastive-{m}": (stage, [f"--model.task_options.contrastive.method={m}"])
                        for m in METHODS})
        else:
            out[stage] = (stage, [])
    return out


def build_trainer(stage: str, overrides: list[str], shape: tuple[int, ...], batch: int, device: torch.device,
                  data_dir: str = "-", stats: dict | None = None) -> Trainer:
    cfg = load_config(None, [f"--data.batch_size={batch}", "--data.num_workers=0", "--optim.min_lr_ratio=1.0",
                             *overrides], stage=stage, data_dir=data_dir, run_dir="-")
    torch.manual_seed(cfg.seed)
    model = build_run_model(cfg, shape, stats)
    engine, precision, _ = make_engine(model.to(device), cfg, 1, device, total_steps=10**9)
    if precision != "fp32":
        raise SystemExit(f"this benchmark compares fp32 steps, the engine chose {precision}")
    return Trainer(cfg, DistInfo(0, 1, 0), engine, None, batches=10**9)


def random_batches(n: int, batch: int, shape: tuple[int, ...], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(batch, *shape, generator=g), "label": torch.randint(0, len(CLASSES), (batch,),
                                                                                     generator=g),
             "target": torch.randn(batch, len(TARGETS), generator=g), "ids": torch.zeros(batch, 3, dtype=torch.long)}
            for _ in range(n)]


def throughput(backbones: list[str], size: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    shape = (1, size, size)
    batches = random_batches(2, batch, shape)
    stats = {"mean": [0.0], "std": [1.0]}
    results: dict = {}
    for backbone in backbones:
        for label, (stage, extra) in stage_variants().items():
            overrides = [f"--model.encoder.name={backbone}", *BACKBONES[backbone], *extra]   # multitask: its defaults
            trainer = build_trainer(stage, overrides, shape, batch, device, stats=stats)
            for i in range(warmup):
                trainer.train_step(batches[i % 2])
            cpu, wall = [], []
            for i in range(steps):
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                trainer.train_step(batches[i % 2])
                cpu.append(time.process_time() - cpu_start)
                wall.append(time.perf_counter() - wall_start)
            step_cpu, step_wall = float(np.median(cpu)), float(np.median(wall))
            results.setdefault(backbone, {})[label] = {
                "tasks": "+".join(trainer.tasks), "step_cpu_s": round(step_cpu, 4), "step_wall_s": round(step_wall, 4),
                "samples_per_s": round(batch / step_cpu, 1), "samples_per_wall_s": round(batch / step_wall, 1)}
            print(f"throughput {backbone:9s} {label:20s} {batch / step_cpu:8.1f} samples/s (CPU time; wall "
                  f"{batch / step_wall:.1f})", file=sys.stderr, flush=True)
            del trainer
    return {"image": list(shape), "batch_size": batch, "steps": steps, "warmup_steps": warmup,
            "load_average_end": list(os.getloadavg()), "results": results}


def simulate(out: Path, n_per_class: int) -> None:
    argv = [sys.executable, "-m", "dlscale.cli", "simulate", "--preset", "model_ii", "--n-per-class",
            str(n_per_class), "--splits", "train=0.8,val=0.2", "--out", str(out), "--device", "cpu"]
    print("simulating:", " ".join(argv[2:]), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def probe(trainer_or_model, data_dir: str, cfg, device: torch.device, probe_samples: int) -> dict:
    model = getattr(trainer_or_model, "module", trainer_or_model)
    train = collect(model, eval_loader(data_dir, cfg.data, 0, 1, "train"), device, torch.float32,
                    max_samples=probe_samples, n_examples=0)
    val = collect(model, eval_loader(data_dir, cfg.data, 0, 1, "val"), device, torch.float32, n_examples=0)
    result = linear_probe(train["features"], train["labels"], val["features"], val["labels"], CLASSES)
    return {"probe_auc_macro": round(result["auc_macro"], 4), "probe_accuracy": round(result["accuracy"], 4),
            "probe_train_samples": int(len(train["labels"])), "val_samples": int(len(val["labels"]))}


def budget(stages: list[str], data_dir: str, seconds: float, batch: int, device: torch.device,
           probe_samples: int) -> dict:
    shape = tuple(json.loads((Path(data_dir) / "manifest.json").read_text())["image_shape"])
    variants = stage_variants()
    results: dict = {}
    control = build_trainer("autoencoder", ["--model.encoder.name=small"], shape, batch, device, data_dir)
    results["random_init"] = {**probe(control, data_dir, control.cfg, device, probe_samples), "steps": 0}
    print(f"budget random_init: probe AUC {results['random_init']['probe_auc_macro']}", file=sys.stderr, flush=True)
    for label in stages:
        stage, extra = variants[label]
        trainer = build_trainer(stage, ["--model.encoder.name=small", *extra], shape, batch, device, data_dir)
        loader = iter(train_loader(data_dir, trainer.cfg.data, 0, 1, trainer.cfg.seed, batches=10**9))
        load_start, steps, losses = os.getloadavg()[0], 0, []
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        while time.process_time() - cpu_start < seconds:
            _, total, _ = trainer.train_step(next(loader))
            losses.append(total)
            steps += 1
        cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
        results[label] = {**probe(trainer, data_dir, trainer.cfg, device, probe_samples), "steps": steps,
                          "samples": steps * batch, "train_cpu_s": round(cpu_s, 1), "train_wall_s": round(wall_s, 1),
                          "samples_per_s": round(steps * batch / cpu_s, 1),
                          "loss_first": round(float(np.mean(losses[:10])), 4),
                          "loss_last": round(float(np.mean(losses[-10:])), 4),
                          "load_average_1min": [load_start, os.getloadavg()[0]]}
        print(f"budget {label}: {steps} steps, probe AUC {results[label]['probe_auc_macro']}", file=sys.stderr,
              flush=True)
        del trainer, loader
    return {"data": data_dir, "encoder": "small", "batch_size": batch, "budget_cpu_s": seconds,
            "probe": "dlscale.metrics.linear_probe: train-split features -> val split", "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("throughput", "budget"), default=["throughput", "budget"])
    p.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    p.add_argument("--image-size", type=int, default=64, help="throughput: side of the random images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="throughput: timed steps per stage and backbone")
    p.add_argument("--warmup", type=int, default=1, help="throughput: untimed steps first")
    p.add_argument("--budget-s", type=float, default=75.0, help="budget: training seconds (CPU time) per stage")
    p.add_argument("--budget-stages", nargs="+", choices=list(stage_variants()), default=list(BUDGET_STAGES))
    p.add_argument("--data", help="budget: a dataset directory (default: simulate a Model II set into a temp dir)")
    p.add_argument("--n-per-class", type=int, default=1000, help="budget: images per class when simulating")
    p.add_argument("--probe-samples", type=int, default=4096, help="budget: train samples fitting the probe")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    device = prepare_process("cpu")
    init_distributed(DistInfo(0, 1, 0), device)
    result: dict = {"device": str(device), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_start": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "throughput" in a.parts:
        result["throughput"] = throughput(a.backbones, a.image_size, a.batch_size, a.steps, a.warmup, device)
    if "budget" in a.parts:
        with tempfile.TemporaryDirectory(prefix="dlscale-pretrain-") as tmp:
            data_dir = a.data
            if data_dir is None:
                data_dir = str(Path(tmp) / "model_ii")
                simulate(Path(data_dir), a.n_per_class)
            result["budget"] = budget(a.budget_stages, data_dir, a.budget_s, a.batch_size, device, a.probe_samples)
    result["load_average_end"] = list(os.getloadavg())
    text = json.dumps(result, indent=1)
    if a.out:
        write_json(a.out, result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
