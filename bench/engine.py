"""dlscale's training step (`Trainer.train_step`: DeepSpeed engine, loss weighting, the step window) vs a plain
PyTorch loop over the same model, losses, weighting, batch and precision.

    python bench/engine.py [--encoder small|resnet18] [--zero-stage 0|1|2] [--weighting fixed|famo] [--steps 10]
    python bench/engine.py --variants eager,channels_last,compile,compile+channels_last   # train.* on / off

Goal: dlscale / plain <= 1.10 at ZeRO 0 and 1 with the fixed weighting, <= 1.15 with FAMO. Both loops run in this
process on a multitask model (reconstruction + classification), interleaved in rounds to share the machine's noise;
the figure is the best round of each. `--variants` adds dlscale's step with `train.compile` and / or
`train.channels_last` (`step_s` and `speedup_vs_eager` each, the compile time apart): on a GPU the 1.3x target of a
compiled channels-last ResNet18; on a CPU compilation takes minutes and channels-last is not the fast layout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from dlscale.distributed import DistInfo
from dlscale.train.config import load_config
from dlscale.train.data import InMemoryStream
from dlscale.train.deepspeed_setup import init_distributed, make_engine, prepare_process
from dlscale.train.trainer import Trainer
from dlscale.train.model import build_run_model


def timed_steps(step, batches, n: int, device: torch.device) -> float:
    start = time.perf_counter()
    for i in range(n):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


VARIANTS = {"eager": [], "channels_last": ["--train.channels_last=true"], "compile": ["--train.compile=true"],
            "compile+channels_last": ["--train.compile=true", "--train.channels_last=true"]}


def variant_steps(a, options: list[str], shape: tuple, batches: list, info, device: torch.device) -> dict:
    """dlscale's step time with each `train.*` variant, interleaved in rounds; the first steps (compilation) apart."""
    trainers, out = {}, {}
    for name in a.variants.split(","):
        cfg = load_config(None, options + VARIANTS[name], stage="multitask", data_dir="-", run_dir="-")
        torch.manual_seed(0)
        engine, _, _ = make_engine(build_run_model(cfg, shape, None).to(device), cfg, 1, device, total_steps=10**6)
        trainers[name] = Trainer(cfg, info, engine, InMemoryStream(batches), batches=len(batches))
        start = time.perf_counter()
        timed_steps(trainers[name].train_step, batches, 2, device)
        out[name] = {"first_steps_s": round(time.perf_counter() - start, 2)}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(a.rounds):
        for name, trainer in trainers.items():
            times[name].append(timed_steps(trainer.train_step, batches, a.steps, device))
    for name in trainers:
        out[name]["step_s"] = round(min(times[name]), 4)
        if "eager" in times:
            out[name]["speedup_vs_eager"] = round(min(times["eager"]) / min(times[name]), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--weighting", default="fixed", choices=["fixed", "famo"])
    p.add_argument("--variants", default="", help="comma-separated among " + ", ".join(VARIANTS))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    options = [f"--model.encoder.name={a.encoder}", f"--data.batch_size={a.batch_size}",
               f"--deepspeed.zero_stage={a.zero_stage}", f"--loss.method={a.weighting}",
               "--model.tasks=[recon,classification]", "--data.num_workers=0"]
    cfg = load_config(None, options, stage="multitask", data_dir="-", run_dir="-")
    device = prepare_process(a.device)
    info = DistInfo(0, 1, 0)
    init_distributed(info, device)
    shape = (1, a.image_size, a.image_size)
    batches = [{"image": torch.rand(a.batch_size, *shape, device=device),
                "label": torch.randint(0, 3, (a.batch_size,), device=device),
                "ids": torch.zeros(a.batch_size, 3, dtype=torch.long)} for _ in range(4)]

    torch.manual_seed(0)
    plain_model = build_run_model(cfg, shape, None).to(device)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, fused=device.type == "cuda")

    def plain_step(batch):
        out = plain_model(batch["image"], batch)
        total, _ = plain_model.weighting(plain_model.losses(out, batch["image"], batch))
        plain_opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_opt.step()

    torch.manual_seed(0)
    engine, precision, _ = make_engine(build_run_model(cfg, shape, None).to(device), cfg, 1, device,
                                       total_steps=10**6)
    if precision != "fp32":
        raise SystemExit("compare at fp32 here (set --device cpu or a config with precision fp32)")
    trainer = Trainer(cfg, info, engine, InMemoryStream(batches), batches=len(batches))

    timed_steps(plain_step, batches, 2, device)
    timed_steps(trainer.train_step, batches, 2, device)
    plain, ds = [], []
    for _ in range(a.rounds):
        plain.append(timed_steps(plain_step, batches, a.steps, device))
        ds.append(timed_steps(trainer.train_step, batches, a.steps, device))
    result = {"device": str(device), "encoder": a.encoder, "batch_size": a.batch_size, "image": list(shape),
              "zero_stage": a.zero_stage, "weighting": a.weighting, "precision": precision,
              "plain_step_s": round(min(plain), 4), "dlscale_step_s": round(min(ds), 4),
              "ratio_dlscale_vs_plain": round(min(ds) / min(plain), 3)}
    if a.variants:
        result["variants"] = variant_steps(a, options, shape, batches, info, device)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
