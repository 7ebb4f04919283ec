"""Super-resolution: bicubic, the SR network from scratch, and the SR network guided by a pretrained encoder (frozen /
fine-tuned), on simulated Model-II-like and Model-III-like 64x64 images, 2x and 4x, with N training images.

    python bench/superres.py [--parts goal scale4 model_iii n_study] [--goal-cpu-s 600] [--steps 300]
                             [--n 100 1000 all] [--repeats 3] [--work-dir runs/bench_superres]     # prints JSON

Pairs as `dlscale transfer --tasks superres` makes them (`dlscale.models.sr`): the image min-max scaled to [0, 1],
its antialiased bicubic downsampling, the network trained with L1 by `dlscale.transfer.tasks.superres.fit_sr`
(Adam, cosine decay, one thread). Images: `--train-per-class` per class (N = all) and `--eval-per-class` per class
held out, simulated in memory (seeded). Every entry: PSNR / SSIM (torchmetrics) mean with a 95% CI (the transfer
study's two-level bootstrap: repeats = subsets of N images drawn with other seeds, and the eval images) and the CPU
seconds of its training (this process's CPU time, so other load on a shared machine changes wall time, not it).

Parts (each entry names its part):
    goal       2x Model-II-like, scratch, N = all, trained for --goal-cpu-s CPU seconds (steps from a timed start),
               PSNR against training images seen at 8 points (`curve`)
    n_study    2x Model-II-like, scratch / frozen / finetune at N in --n, --repeats subsets each, --steps steps;
               the encoder: the small CNN (width 24) pretrained as an autoencoder on the Model II simulation stream
               (--pretrain-batches batches of 32), or --encoder
    scale4     4x Model-II-like, scratch, N = all, --steps4 steps
    model_iii  2x Model-III-like, scratch, N = all, --steps steps
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dlscale.data.classes import CLASSES
from dlscale.models.sr import SRConfig, bicubic_down, bicubic_up, unit_range
from dlscale.sim.config import preset_config
from dlscale.sim.simulator import LensSimulator
from dlscale.transfer.bootstrap import summarize_draws, weighted_mean
from dlscale.transfer.tasks.superres import GUIDANCE, Guide, SuperresOptions, fit_sr, per_image, super_resolve

PARTS = ("goal", "scale4", "model_iii", "n_study")


def simulate(preset: str, per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(images in [0, 1] per image (N, 1, 64, 64), labels), classes interleaved by a seeded shuffle."""
    sim = LensSimulator(preset_config(preset), device="cpu")
    images, labels = [], []
    for k, name in enumerate(CLASSES):
        for b, start in enumerate(range(0, per_class, 256)):
            part, _ = sim.simulate(name, min(256, per_class - start), *sim.generators(seed * 100 + k, b))
            images.append(np.asarray(part))
            labels += [k] * len(part)
    order = np.random.default_rng(seed).permutation(len(labels))
    return unit_range(torch.from_numpy(np.concatenate(images)[order]).float())[0], np.asarray(labels)[order]


def scored(preds: list[dict], n_boot: int) -> dict:
    """Mean and 95% CI of PSNR and SSIM over repeats (`preds`: per-repeat per-image arrays)."""
    n_eval = len(preds[0]["psnr"])
    summary = summarize_draws(lambda r, counts: {k: weighted_mean(v, counts) for k, v in preds[r].items()},
                              len(preds), n_eval, n_boot, 0)
    out = {}
    for key in ("psnr", "ssim"):
        out[key] = round(summary["mean"][key], 4 if key == "psnr" else 6)
        out[f"{key}_ci"] = [round(summary["ci_low"][key], 4), round(summary["ci_high"][key], 4)]
    out["repeats"] = [round(r["psnr"], 3) for r in summary["repeats"]]
    return out


class Data:
    def __init__(self, preset: str, a) -> None:
        self.train, _ = simulate(preset, a.train_per_class, 1)
        self.eval, self.eval_labels = simulate(preset, a.eval_per_class, 2)
        self.preset = preset

    def subset(self, n, r: int) -> torch.Tensor:
        if n == "all":
            return self.train
        return self.train[torch.from_numpy(np.random.default_rng(100 + r).permutation(len(self.train))[:n])]


def bicubic_entry(data: Data, scale: int, a, part: str) -> dict:
    low = bicubic_down(data.eval, scale)
    return {"part": part, "method": "bicubic", "preset": data.preset, "scale": scale, "n_train": 0, "cpu_s": 0.0,
            **scored([per_image(bicubic_up(low, scale), data.eval)], a.n_bootstrap)}


def fit_entries(data: Data, method: str, n, scale: int, steps: int, a, part: str, guide_path: str | None = None,
                curve: bool = False) -> dict:
    """One entry: `method` fitted on `a.repeats` subsets of n images (one at N = all with --goal-like parts)."""
    opts = SuperresOptions(steps=steps, batch_size=a.batch_size, lr=a.lr, network=SRConfig(
        scale=scale, channels=a.channels, blocks=a.blocks))
    low = bicubic_down(data.eval, scale)
    preds, cpu, points = [], [], []
    repeats = 1 if n == "all" and part != "n_study" else a.repeats
    for r in range(repeats):
        guide = None
        if GUIDANCE[method].encoder:
            from dlscale.export import load_encoder
            encoder = load_encoder(guide_path)
            guide = Guide(encoder, encoder.dlscale.get("normalize", "minmax"))
        eval_cpu, start = [0.0], [0.0]

        def progress(step, net):
            t = time.process_time()
            train_cpu = t - start[0] - eval_cpu[0]
            psnr = float(per_image(super_resolve(net, low, guide), data.eval)["psnr"].mean())
            eval_cpu[0] += time.process_time() - t
            points.append({"images_seen": step * a.batch_size, "cpu_s": round(train_cpu, 1), "psnr": round(psnr, 3)})
            print(f"  {part} {method} n={n} step {step}/{steps}: {psnr:.2f} dB after {train_cpu:.0f} CPU-s (load "
                  f"{os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

        start[0] = time.process_time()
        net = fit_sr(data.subset(n, r), opts, r, guide, GUIDANCE[method].train_encoder,
                     every=max(steps // 8, 1) if curve else 0, on_progress=progress if curve else None)
        cpu.append(time.process_time() - start[0] - eval_cpu[0])
        preds.append(per_image(super_resolve(net, low, guide), data.eval))
        print(f"  {part} {method} n={n} repeat {r}: {preds[-1]['psnr'].mean():.2f} dB, {cpu[-1]:.0f} CPU-s",
              file=sys.stderr, flush=True)
    entry = {"part": part, "method": method, "preset": data.preset, "scale": scale,
             "n_train": len(data.train) if n == "all" else n, "steps": steps, "batch_size": a.batch_size,
             "cpu_s": round(float(np.mean(cpu)), 1), **scored(preds, a.n_bootstrap)}
    if curve:
        entry["curve"] = points
    return entry


def pretrain_encoder(work: Path, a) -> str:
    """The small CNN (width 24) pretrained as an autoencoder on the Model II simulation stream; its encoder.pt."""
    run = work / "encoder_ae"
    if not (run / "encoder.pt").is_file():
        subprocess.run([sys.executable, "-m", "dlscale.cli", "train", "--stage", "autoencoder", "--run-dir", str(run),
                        "--data.source=simulate", "--data.simulator.eval_per_class=50",
                        "--data.simulator.probe_per_class=50", "--model.encoder.name=small",
                        "--model.encoder.width=24", "--data.batch_size=32", "--data.num_workers=0",
                        f"--schedule.batches_per_epoch={a.pretrain_batches}", "--schedule.epochs=1",
                        "--eval.n_bootstrap=0"], check=True, stdout=sys.stderr,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return str(run / "encoder.pt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--goal-cpu-s", type=float, default=600.0)
    p.add_argument("--steps", type=int, default=300, help="steps of the n_study and model_iii fits")
    p.add_argument("--steps4", type=int, default=600, help="steps of the 4x fit")
    p.add_argument("--n", nargs="+", default=["100", "1000", "all"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=800)
    p.add_argument("--eval-per-class", type=int, default=100)
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--pretrain-batches", type=int, default=150)
    p.add_argument("--encoder", default=None, help="encoder.pt for the guided fits (default: pretrain one)")
    p.add_argument("--work-dir", default="runs/bench_superres")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [n if n == "all" else int(n) for n in a.n]
    started, load = time.time(), os.getloadavg()
    entries: list[dict] = []
    model_ii = Data("model_ii", a)

    def record(entry: dict) -> None:
        entries.append(entry)
        (work / "partial.json").write_text(json.dumps(entries, indent=1))

    def goal() -> None:
        record(bicubic_entry(model_ii, 2, a, "goal"))
        opts = SuperresOptions(steps=20, batch_size=a.batch_size, network=SRConfig(channels=a.channels,
                                                                                    blocks=a.blocks))
        t = time.process_time()
        fit_sr(model_ii.train, opts, 0)
        steps = int(a.goal_cpu_s / ((time.process_time() - t) / 20))
        record(fit_entries(model_ii, "scratch", "all", 2, steps, a, "goal", curve=True))

    def scale4() -> None:
        record(bicubic_entry(model_ii, 4, a, "scale4"))
        record(fit_entries(model_ii, "scratch", "all", 4, a.steps4, a, "scale4"))

    def model_iii() -> None:
        data = Data("model_iii", a)
        record(bicubic_entry(data, 2, a, "model_iii"))
        record(fit_entries(data, "scratch", "all", 2, a.steps, a, "model_iii"))

    def n_study() -> None:
        encoder = a.encoder or pretrain_encoder(work, a)
        for n in sizes:
            for method in GUIDANCE:
                record(fit_entries(model_ii, method, n, 2, a.steps, a, "n_study", encoder))

    for part in a.parts:      # in the order asked
        {"goal": goal, "scale4": scale4, "model_iii": model_iii, "n_study": n_study}[part]()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"entries": entries, "load_average_1min": [round(load[0], 2), round(os.getloadavg()[0], 2)],
                      "wall_s": round(time.time() - started, 1), "user_s": round(usage.ru_utime, 1),
                      "system_s": round(usage.ru_stime, 1), "torch_threads": 1,
                      "settings": {k: v for k, v in vars(a).items() if k != "work_dir"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
