"""The encoder as a foundation: what pretraining from the simulation stream buys a linear probe as it sees more
images, and how an encoder pretrained on one instrument transfers to another.

    python bench/foundation.py [--parts seen transfer] [--methods autoencoder mae simclr byol recon+simclr]
                               [--backbones small resnet18] [--images 5000 50000 500000] [--budget-s 3600]
                               [--work-dir runs/bench_foundation]                                 # prints JSON

Labelled data: the quickstart's (`dlscale quickstart` small scale: Model-II-like 64x64, 2,000 images per class,
60% train / 40% validation), simulated once into WORK/data.
1. seen: each self-supervised method pretrains from the Model II simulation stream (fresh images, none repeated) on
   about 5k / 50k / 500k images, for the small CNN (width 24, the demo's) and ResNet18 (standard stem), as a step
   of the quickstart's small scale (`dlscale.quickstart_config.with_step`, `quickstart.train_step`: every local
   rank); then `dlscale transfer
   --methods probe,random --labels-per-class 100`: probe accuracy and macro AUC with 95% CIs (two-level bootstrap
   over `--repeats` label subsets and the validation images), beside the random-init control.
2. transfer: the demo's recipe (recon+simclr) pretrains on the Model I stream (150x150, noisy, resized to 64x64),
   then probe, fine-tune and scratch on the Model II set at 100 and 1,000 labels per class, beside the same recipe
   pretrained on Model II itself (part 1's cell with as many images, when measured) and Lens-LeJEPA's published
   figures (ViT-S, ~6 GPU-hours, pretrained on Model I, evaluated on Model II).
Wall and CPU seconds and the load average are recorded beside every figure (AUC does not depend on machine load,
wall time does). Part 1 runs its cells cheapest first (images x the backbone's relative cost); a cell whose
estimated cost (CPU seconds per image measured by the same backbone and method on a smaller cell, over the ranks)
exceeds what is left of `--budget-s` is skipped and recorded with that estimate.
Finished pretraining runs and studies in WORK are reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

METHODS = ("autoencoder", "mae", "simclr", "byol", "recon+simclr")
BACKBONES = {"small": {"model": {"encoder": {"name": "small", "width": 24}}},
             "resnet18": {"model": {"encoder": {"name": "resnet18", "small_input_stem": False}}}}
RELATIVE_COST = {"small": 1, "resnet18": 10}   # CPU per image against the small CNN (bench/pretrain.py), for order
# Lens-LeJEPA (ViT-S pretrained on Model I) on Model II, accuracy by labels per class: frozen probe, fine-tuned.
LENS_LEJEPA = {"probe": {100: 0.48, 1000: 0.80, 5000: 0.90}, "finetune": {100: 0.49, 1000: 0.81, 5000: 0.90}}


def recipe(method: str) -> tuple[str, dict]:
    """(stage, settings) of a pretraining method; contrastive views are the demo's lensing-safe ones."""
    from dlscale.quickstart_config import recipe_parts
    parts = recipe_parts()
    views = parts["pretrain_model"]["task_options"]["contrastive"]["views"]
    return {"autoencoder": ("autoencoder", {}), "mae": ("mae", {}),
            "simclr": ("contrastive", {"model": {"task_options": {"contrastive": {"method": "simclr",
                                                                                  "views": views}}}}),
            "byol": ("contrastive", {"model": {"task_options": {"contrastive": {"method": "byol", "views": views}}}}),
            "recon+simclr": ("multitask", {"model": parts["pretrain_model"], "loss": parts["pretrain_loss"]})}[method]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the ranks of a launch)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


@dataclasses.dataclass
class Budget:
    """Wall seconds left, and the CPU seconds per pretraining image each (backbone, method) has cost so far."""
    deadline: float
    ranks: int
    rates: dict = dataclasses.field(default_factory=dict)

    def refuse(self, key: tuple, images: int) -> str | None:
        """Why a cell of `images` would not fit (None: run it)."""
        left = self.deadline - time.monotonic()
        rate = self.rates.get(key)
        estimate = images * rate / self.ranks if rate else 0.0
        if left <= 0 or estimate > left:
            cost = f"about {estimate:.0f} s of pretraining estimated" if rate else \
                "no smaller cell of this backbone and method ran to estimate its cost"
            return f"budget: {cost}, {max(left, 0):.0f} s left"
        return None


def pretrain(work: Path, data: Path, name: str, stage: str, settings: dict, images: int, backbone: dict,
             preset_settings: dict | None = None) -> dict:
    """One stream pretraining of about `images` fresh images (whole stream epochs of the train split's size),
    as a step of the quickstart's small scale in WORK; its cost, or "reused"."""
    from dlscale import io
    from dlscale.configtree import merge
    from dlscale.quickstart import is_done, record_path, train_step
    from dlscale.quickstart_config import load_quickstart_config, with_step
    from dlscale.quickstart_report import stream_images
    n_train = io.read_json(data / "manifest.json")["splits"]["train"]["samples"]
    epochs = max(1, math.ceil(images / n_train))
    own = {"schedule": {"epochs": epochs}, "optim": {"warmup_steps": min(50, epochs * 5)}}
    train = merge(merge(merge(backbone, settings), preset_settings or {}), own)
    cfg = with_step(load_quickstart_config("small", given={"out": str(work)}), name,
                    {"stage": stage, "from_stream": True, "train": train})
    run_dir, cost = work / name, {"reused": True}
    if not is_done(run_dir):
        load, wall, cpu = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
        train_step(cfg.steps[name].train, record_path(work, name))
        cost = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
                "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
    return {"run": str(run_dir), "images": stream_images(run_dir),
            "samples_per_s": round(io.read_json(run_dir / "metrics.json")["throughput/samples_per_s"], 1), **cost}


def study(work: Path, data: Path, encoder: str, name: str, labels: list[int], methods: list[str],
          repeats: int) -> list[dict]:
    """`dlscale transfer` of one encoder on the labelled set: accuracy and macro AUC (95% CI) per method and N."""
    from dlscale.quickstart_config import load_quickstart_config
    from dlscale.transfer import run_transfer
    small = load_quickstart_config("small", given={"out": str(work)}).transfer   # the demo's study, other inputs
    cfg = dataclasses.replace(small, encoders=[encoder], data_dir=str(data), out=str(work / "transfer" / name),
                              labels_per_class=labels, repeats=repeats, methods=methods, n_bootstrap=300).validate()
    return [{"method": c["method"], "n_per_class": c["n_per_class"], "repeats": len(c["repeats"]),
             **{k: round(c["mean"][k], 4) for k in ("accuracy", "auc_macro")},
             **{f"{k}_ci": [round(c["ci_low"][k], 4), round(c["ci_high"][k], 4)] for k in ("accuracy", "auc_macro")}}
            for c in run_transfer(cfg)["cells"]]


def seen_part(work: Path, data: Path, a, budget: Budget) -> list[dict]:
    """Probe at 100 labels per class against pretraining images seen, per backbone and method; cheapest cells
    first, so the budget buys every method at the small sizes before any at the large ones."""
    cells = []
    order = sorted(itertools.product(a.images, a.backbones, a.methods),
                   key=lambda c: (c[0] * RELATIVE_COST[c[1]], a.backbones.index(c[1])))
    for images, backbone, method in order:
        key, cell = (backbone, method), {"backbone": backbone, "method": method, "target_images": images}
        refused = budget.refuse(key, images)
        if refused:
            cells.append({**cell, "skipped": refused})
            continue
        stage, settings = recipe(method)
        name = f"{backbone}-{method}-{images}"
        run = pretrain(work, data, name, stage, settings, images, BACKBONES[backbone])
        if "cpu_s" in run:
            budget.rates[key] = run["cpu_s"] / run["images"]
        probe = study(work, data, run["run"], name, [100], ["probe", "random"], a.repeats)
        cells.append({**cell, "pretraining": run, "probe_100": probe})
        print(f"seen {name}: {json.dumps(probe)}", file=sys.stderr, flush=True)
    return cells


def transfer_part(work: Path, data: Path, a, seen: list[dict]) -> dict:
    """The demo's recipe pretrained on Model I, scored on Model II at 100 and 1,000 labels per class."""
    stage, settings = recipe("recon+simclr")
    run = pretrain(work, data, f"model_i-recon+simclr-{a.transfer_images}", stage, settings, a.transfer_images,
                   BACKBONES["small"], {"data": {"simulator": {"preset": "model_i"}, "resize": 64}})
    cells = study(work, data, run["run"], "model_i_to_model_ii", [100, 1000],
                  ["probe", "finetune", "scratch", "random"], a.repeats)
    in_domain = next((c for c in seen if c["backbone"] == "small" and c["method"] == "recon+simclr"
                      and c["target_images"] == a.transfer_images and "probe_100" in c), None)
    return {"pretrained_on": "model_i stream, 150x150 resized to 64x64", "evaluated_on": "model_ii (the labelled set)",
            "encoder": "small CNN width 24", "pretraining": run, "cells": cells,
            "same_recipe_pretrained_on_model_ii": in_domain and in_domain["probe_100"],
            "lens_lejepa_accuracy": LENS_LEJEPA}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("seen", "transfer"), default=["seen", "transfer"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    p.add_argument("--images", nargs="+", type=int, default=[5000, 50000, 500000],
                   help="pretraining images seen (rounded up to whole stream epochs)")
    p.add_argument("--transfer-images", type=int, default=50000, help="transfer part: Model I pretraining images")
    p.add_argument("--repeats", type=int, default=3, help="label subsets per N")
    p.add_argument("--budget-s", type=float, default=3600.0, help="wall seconds for part seen's pretraining cells")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_foundation"))
    a = p.parse_args(argv)
    # Training ranks inherit stdout; the JSON goes to the original stdout alone (bench/run_all.py parses it).
    result_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from dlscale.distributed import local_ranks
    from dlscale.quickstart import make_data
    from dlscale.quickstart_config import load_quickstart_config
    start, load = time.perf_counter(), os.getloadavg()
    data = make_data(load_quickstart_config("small", given={"out": str(a.work_dir)}), force=False)
    budget = Budget(time.monotonic() + a.budget_s, local_ranks())
    result: dict = {"benchmark": "foundation", "data": str(data), "ranks": local_ranks(), "cpus": os.cpu_count(),
                    "load_average_start": list(load), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    result["seen"] = seen_part(a.work_dir, data, a, budget) if "seen" in a.parts else []
    if "transfer" in a.parts:
        result["transfer"] = transfer_part(a.work_dir, data, a, result["seen"])
    result.update(load_average_end=list(os.getloadavg()), wall_s=round(time.perf_counter() - start, 1))
    (a.work_dir / "foundation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), file=result_stream, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
