"""Part 5 of the GPU check: a shortened `dlscale quickstart --scale full`, the whole path on CUDA with its report.

`--scale full` has no size options yet, so the check runs its chain with the sizes cut (Model-I-like 150x150 data,
a few thousand images per class, 1-2 epochs per stage, ResNet18 with the 3x3 stem, bf16), laid out as the quickstart
lays out its folder; `dlscale quickstart --out THAT --scale full` then finds every step finished, as it does on a
second run, and only writes report.md, which is copied into the output folder. If the quickstart ever gains size
options (`--n-per-class` and `--epochs`), they are used directly instead.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from harness import tail
from runinfo import run_figures

STAGES = ("autoencoder", "supervised", "multitask")
EPOCHS = {"autoencoder": 1, "supervised": 2, "multitask": 2}
FULL_SCALE = ["--model.encoder.name=resnet18", "--model.encoder.small_input_stem=true", "--data.batch_size=128",
              "--data.num_workers=8", "--optim.lr=1e-3", "--optim.warmup_steps=50", "--eval.probe_samples=2000",
              "--eval.n_bootstrap=50", "--schedule.log_every=10", "--schedule.checkpoint_every=100000"]
REPORT_TIMEOUT_S = 90.0       # the report-only quickstart call; longer means it did not reuse the chain's steps


def quickstart_part(check, entry: dict, slice_s: float) -> None:
    if not check.cuda:
        entry["skipped"] = "no CUDA"
        return
    needed = 30 + len(STAGES) * (check.overhead_s + 10)   # simulate + report, and each stage's start-up + eval
    if slice_s < needed and not check.tiny:
        entry["skipped"] = (f"budget: {slice_s:.0f} s left, the chain needs about {needed:.0f} s ({len(STAGES)} "
                            f"stages at ~{check.overhead_s:.0f} s start-up + evaluation each)")
        return
    deadline = time.monotonic() + slice_s
    out = check.work / "quickstart"
    shutil.rmtree(out, ignore_errors=True)
    n = 60 if check.tiny else int(min(3000, max(500, slice_s * 12)))
    options = set(re.findall(r"--[a-z][a-z0-9-]*", check.help_text(check.cli("quickstart", "--help"))))
    direct = {"--n-per-class", "--epochs"} <= options
    entry["settings"] = {"mode": "quickstart size options" if direct else "chain, then quickstart writes the report",
                         "preset": "model_i", "n_per_class": n, "epochs": EPOCHS, "train_overrides": FULL_SCALE,
                         "precision": check.precision}
    if direct:
        check.report.item(entry, "quickstart", lambda item: run_direct(check, item, out, n, deadline))
    else:
        run_chain(check, entry, out, n, deadline)
    report = out / "report.md"
    if report.is_file():
        shutil.copyfile(report, check.out / "report.md")
        entry["report_md"] = report.read_text()
        if (out / "roc.png").is_file():
            shutil.copyfile(out / "roc.png", check.out / "quickstart_roc.png")
    entry["figures"] = {"report_written": report.is_file(), "wall_s": slice_s - (deadline - time.monotonic())}


def run_direct(check, item: dict, out: Path, n: int, deadline: float) -> None:
    args = ["quickstart", "--out", out, "--scale", "full", "--n-per-class", n, "--epochs", 2]
    result = check.report.run(check.cli(*args), deadline - time.monotonic(), check.env, "quickstart")
    item["settings"] = {"command": "dlscale " + " ".join(map(str, args))}
    if not result.ok:
        raise RuntimeError(f"{result.failure()}\n{tail(result.output)}")


def run_chain(check, entry: dict, out: Path, n: int, deadline: float) -> None:
    data = out / "data"

    def simulate(item: dict) -> None:
        args = ["simulate", "--preset", "model_i", "--n-per-class", n, "--out", data, "--splits", "train=0.8,val=0.2",
                "--seed", 0, "--batch-size", 512, "--device", check.device]
        result = check.report.run(check.cli(*args), 0.3 * (deadline - time.monotonic()), check.env, "simulate 150x150")
        item["settings"] = {"command": "dlscale " + " ".join(map(str, args))}
        if not result.ok:
            raise RuntimeError(f"{result.failure()}\n{tail(result.output)}")
        manifest = json.loads((data / "manifest.json").read_text())
        images = sum(s["samples"] for s in manifest["splits"].values())
        item["figures"] = {"images": images, "wall_s": result.seconds, "images_per_s_cli": images / result.seconds}

    if "error" in check.report.item(entry, "simulate", simulate):
        return
    for i, stage in enumerate(STAGES):
        # an even share of what is left (20 s kept for the report call), but never less than a stage's start-up +
        # evaluation as part 3 measured it: this is the last part, the watchdog stops an overrun
        share = max((deadline - time.monotonic() - 20) / (len(STAGES) - i), 1.5 * check.overhead_s + 30)
        item = check.report.item(entry, stage, lambda item, s=stage, t=share: train_stage(check, item, s, out, t))
        if "error" in item:
            return
    check.report.item(entry, "report", lambda item: write_report(check, item, out, deadline))


def train_stage(check, item: dict, stage: str, out: Path, timeout_s: float) -> None:
    args = ["--stage", stage, "--data", str(out / "data"), "--run-dir", str(out / stage), "--seed=0",
            f"--device={check.device}", f"--deepspeed.precision={check.precision}", *FULL_SCALE,
            f"--schedule.epochs={EPOCHS[stage]}"]
    if stage == "multitask":   # as the quickstart: fixed equal weights, encoder from the autoencoder
        weights = check.config_key("loss.fixed.weights", "loss.weights")
        args += ["--loss.method=fixed", f"--{weights}={{recon: 1.0, classification: 1.0}}",
                 "--init-from", str(out / "autoencoder" / "encoder.pt")]
    item["settings"] = {"command": "torchrun --standalone --nproc_per_node 1 -m dlscale.train " + " ".join(args)}
    result = check.report.run(check.train_cmd(args), timeout_s, check.env, f"quickstart chain {stage}")
    item["figures"] = {"wall_s": result.seconds, **run_figures(out / stage, result.output, 128)}
    if not result.ok:
        raise RuntimeError(f"{result.failure()}\n{tail(result.output)}")


def write_report(check, item: dict, out: Path, deadline: float) -> None:
    timeout = min(REPORT_TIMEOUT_S, max(30.0, deadline - time.monotonic() + 30))
    result = check.report.run(check.cli("quickstart", "--out", out, "--scale", "full"), timeout, check.env,
                              "quickstart (report of the finished chain)")
    item["figures"] = {"wall_s": result.seconds}
    if not result.ok:
        raise RuntimeError(f"{result.failure()} (it should only have written the report: did it stop reusing "
                           f"finished steps?)\n{tail(result.output)}")
    if not (out / "report.md").is_file():
        raise RuntimeError(f"dlscale quickstart exited 0 but wrote no {out / 'report.md'}")
