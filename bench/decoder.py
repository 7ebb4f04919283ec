"""Cost of the reconstruction decoder: training batches/s of an encoder alone vs encoder + `Decoder`, per backbone.

    python bench/decoder.py [--encoders small vit_tiny] [--sizes 64 150] [--batch-size 32]     # prints JSON

Goal: the decoder at most doubles the step time of the small encoder (the previous decoder made it ~7x slower).
Both loops run in this process, interleaved in rounds to share noise; one torch thread on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from dlscale.models import EncoderConfig, build_encoder
from dlscale.models.heads import Decoder


def batches_per_second(modules: list[torch.nn.Module], x: torch.Tensor, seconds: float) -> float:
    """SGD steps/s of `modules` chained, on a reconstruction-like loss of their output."""
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=1e-4)

    def step() -> None:
        out = x
        for module in modules:
            out = module(out)
        opt.zero_grad(set_to_none=True)
        out.square().mean().backward()
        opt.step()
    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoders", nargs="+", default=["small", "resnet18", "vit_tiny"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 150])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name in a.encoders:
        for size in a.sizes:
            torch.manual_seed(0)
            shape = (1, size, size)
            encoder = build_encoder(EncoderConfig(name=name), shape).to(a.device)
            decoder = Decoder(encoder.out_channels, shape, scale=encoder.downsample).to(a.device)
            x = torch.randn(a.batch_size, *shape, device=a.device)
            alone, both = [], []
            for _ in range(a.rounds):
                alone.append(batches_per_second([encoder], x, a.seconds))
                both.append(batches_per_second([encoder, decoder], x, a.seconds))
            results[f"{name}/{size}"] = {"encoder_batches_per_s": round(max(alone), 2),
                                         "encoder_decoder_batches_per_s": round(max(both), 2),
                                         "decoder_slowdown": round(max(alone) / max(both), 2)}
    print(json.dumps({"batch_size": a.batch_size, "device": a.device, "load_average": os.getloadavg(),
                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
