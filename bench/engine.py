"""DeepSpeed engine overhead: step time of the dlscale engine setup vs a plain PyTorch loop, same model/batch/precision.

    python bench/engine.py [--encoder resnet18] [--batch-size 32] [--steps 20]     # prints JSON

Goal (issue 4): DeepSpeed / plain <= 1.10. Both loops run in this process, interleaved in rounds to share noise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from dlscale.dist import DistInfo
from dlscale.train.config import load_config
from dlscale.train.deepspeed_setup import init_distributed, make_engine, prepare_process
from dlscale.train.model import build_model


def timed_steps(step, batches, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        step(*batches[i % len(batches)])
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--zero-stage", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(None, [f"--model.encoder.name={a.encoder}", f"--data.batch_size={a.batch_size}",
                             f"--deepspeed.zero_stage={a.zero_stage}"], stage="supervised", data_dir="-", run_dir="-")
    device = prepare_process(a.device)
    init_distributed(DistInfo(0, 1, 0), device)
    shape = (1, a.image_size, a.image_size)
    batches = [(torch.rand(a.batch_size, *shape, device=device), torch.randint(0, 3, (a.batch_size,), device=device))
               for _ in range(4)]

    torch.manual_seed(0)
    plain_model = build_model("supervised", cfg.model.encoder, shape).to(device)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, fused=device.type == "cuda")

    def plain_step(x, y):
        loss = F.cross_entropy(plain_model(x)["logits"], y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    engine, precision, _ = make_engine(build_model("supervised", cfg.model.encoder, shape).to(device), cfg, 1,
                                       device, total_steps=10**6)
    if precision != "fp32":
        raise SystemExit("compare at fp32 here (set --device cpu or a config with precision fp32)")

    def ds_step(x, y):
        loss = F.cross_entropy(engine(x)["logits"], y)
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    timed_steps(plain_step, batches, 2)
    timed_steps(ds_step, batches, 2)
    plain, ds = [], []
    for _ in range(a.rounds):
        plain.append(timed_steps(plain_step, batches, a.steps))
        ds.append(timed_steps(ds_step, batches, a.steps))
    result = {"device": str(device), "encoder": a.encoder, "batch_size": a.batch_size, "image": list(shape),
              "zero_stage": a.zero_stage,
              "precision": precision, "plain_step_s": round(min(plain), 4), "deepspeed_step_s": round(min(ds), 4),
              "ratio_deepspeed_vs_plain": round(min(ds) / min(plain), 3)}
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
