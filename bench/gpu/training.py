"""Part 3 of the GPU check: training on one GPU through the real entry point (torchrun -m dlscale.train), bf16,
next to the same model in a plain PyTorch loop; `engine_run` also serves parts 4 and 5.

Each run gets a slice of the part's time and a step count chosen to fit it: the plain loop runs first and gives
the step time, the engine's start-up + evaluation cost is a guess updated after every run.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

from harness import GpuMemorySampler, tail
from runinfo import run_figures

FULL = {"n_per_class": 8000, "batch": 512, "workers": 8, "plain_seconds": 2.0, "min_train_s": 10.0,
        "probe_samples": 2048, "n_bootstrap": 20, "max_steps": 20000}
TINY = {"n_per_class": 30, "n_pix": 16, "batch": 8, "workers": 0, "plain_seconds": 0.2, "steps": 3,
        "probe_samples": 24, "n_bootstrap": 10}
DEFAULT_STEP_S = 0.05                 # a guess when the plain loop gave nothing
MIN_OVERHEAD_S = 10.0                 # floor of the planned start-up + evaluation + export time of a run
MAIN_RUNS = (("supervised", "resnet18"), ("multitask", "resnet18"))
MAIN_RUN_WEIGHT = 2.0                 # their share of the part's time against 1 for each further stage / encoder


def sizes(check) -> dict:
    return TINY if check.tiny else FULL


def encoder_settings(name: str) -> dict:
    """resnet18 with the 3x3 stride-1 stem (no max-pool) on these small images; other encoders as they come."""
    return {"name": name, "small_input_stem": True} if name == "resnet18" else {"name": name}


def plan_runs(check, entry: dict) -> list[tuple[str, str]]:
    """supervised and multitask ResNet18 first, then every further stage `--stage` offers, then vit_small."""
    stages = check.train_stages()
    if check.tiny:
        return [("supervised", "resnet18")]
    runs = [(s, "resnet18") for s in ("supervised", "multitask") if s in stages]
    runs += [(s, "resnet18") for s in stages if s not in ("supervised", "multitask")]
    encoders = check.encoders or []
    if "vit_small" in encoders:
        runs.append(("supervised", "vit_small"))
    else:
        entry.setdefault("items", {})["supervised/vit_small"] = {
            "status": "skipped", "skipped": f"no vit_small encoder here (encoders: {', '.join(encoders) or '?'})"}
    return runs


def make_data(check, item: dict, part_slice_s: float) -> Path:
    """64x64 Model-II-like shards through `dlscale simulate` on the check's device, sized to the part's time."""
    size = sizes(check)
    out = check.work / "data64"
    shutil.rmtree(out, ignore_errors=True)
    n = size["n_per_class"] if check.tiny else int(min(size["n_per_class"], max(2000, part_slice_s * 30)))
    slice_s = max(30.0, 0.15 * part_slice_s)
    args = ["simulate", "--preset", "model_ii", "--n-per-class", n, "--out", out, "--seed", 0,
            "--device", check.device]
    args += ["--splits", "train=0.8,val=0.2", f"--instrument.n_pix={size['n_pix']}"] if check.tiny else \
        ["--splits", "train=0.9,val=0.1", "--batch-size", 4096]
    result = check.report.run(check.cli(*args), slice_s, check.env, "simulate 64x64 shards")
    item["settings"] = {"preset": "model_ii", "n_per_class": n, "device": check.device, "command": "dlscale " +
                        " ".join(map(str, args))}
    if not result.ok:
        raise RuntimeError(f"{result.failure()}\n{tail(result.output)}")
    manifest = json.loads((out / "manifest.json").read_text())
    images = sum(s["samples"] for s in manifest["splits"].values())
    item["figures"] = {"images": images, "image_shape": manifest["image_shape"], "wall_s": result.seconds,
                       "images_per_s_cli": images / result.seconds}
    return out


def training_part(check, entry: dict, slice_s: float) -> None:
    if not check.cuda and not check.tiny:
        entry["skipped"] = "no CUDA"
        return
    deadline = time.monotonic() + slice_s
    size = sizes(check)
    runs = plan_runs(check, entry)
    entry["settings"] = {"device": check.device, "precision": check.precision, "batch": size["batch"],
                         "num_workers": size["workers"], "launcher": "torchrun --standalone --nproc_per_node 1",
                         "runs": [f"{s}/{e}" for s, e in runs]}
    holder: dict = {}
    data_item = check.report.item(entry, "data", lambda item: holder.update(
        data=make_data(check, item, slice_s)))
    if "data" not in holder:
        for stage, encoder in runs:
            entry["items"][f"{stage}/{encoder}"] = {"status": "skipped", "skipped": "no data (see item data)"}
        return
    shape = tuple(data_item["figures"]["image_shape"])
    plain = plain_loops(check, runs, shape, timeout_s=max(30.0, 0.25 * (deadline - time.monotonic())))
    pending = list(runs)
    while pending:
        left = deadline - time.monotonic()
        while len(pending) > 1 and len(pending) * check.overhead_s > left:
            stage, encoder = pending.pop()     # too little time for all: the last in priority order goes
            entry["items"][f"{stage}/{encoder}"] = {"status": "skipped", "skipped": (
                f"budget: {left:.0f} s left for {len(pending) + 1} runs at ~{check.overhead_s:.0f} s start-up + "
                "evaluation each; a second try: --only training with a larger --budget-s")}
        weights = [MAIN_RUN_WEIGHT if run in MAIN_RUNS else 1.0 for run in pending]
        # its weighted share, but at least what a run needs when that much is left (the later runs give way)
        share = min(left, max(left * weights[0] / sum(weights), check.overhead_s + size.get("min_train_s", 0.0)))
        stage, encoder = pending.pop(0)
        check.report.item(entry, f"{stage}/{encoder}", lambda item, s=stage, e=encoder, t=share: engine_run(
            check, item, s, e, holder["data"], shape, t, plain=plain.get(f"{s}/{e}")))
    host_transforms(check, entry, holder["data"], shape, deadline, plain.get("supervised/resnet18"))
    throughput_rows(check, entry, holder["data"], shape, deadline, plain.get("supervised/resnet18"))
    entry["figures"] = headline(entry["items"])


def host_transforms(check, entry: dict, data: Path, shape: tuple, deadline: float, plain: dict | None) -> None:
    """The main supervised run once more with normalisation and augmentation in the DataLoader workers
    (`data.transforms=host`; the runs above do them on the GPU), for the data-wait fraction with and without."""
    name, left = "supervised/resnet18 transforms=host", deadline - time.monotonic()
    if "data.transforms" not in check.train_keys():
        entry["items"][name] = {"status": "skipped", "skipped": "no data.transforms key in --print-config"}
        return
    if not check.cuda:     # on a CPU the workers and the training process share one kind of processor
        entry["items"][name] = {"status": "skipped", "skipped": "no CUDA"}
        return
    if importlib.util.find_spec("numba") is None:   # the host row writer's compiler; llvmlite's wheel (60 MB) is
        entry["items"][name] = {"status": "skipped", "skipped": "numba is not installed"}   # more than is carried
        return
    if left < check.overhead_s + sizes(check).get("min_train_s", 0.0):
        entry["items"][name] = {"status": "skipped", "skipped": f"budget: {left:.0f} s left"}
        return
    check.report.item(entry, name, lambda item: engine_run(
        check, item, "supervised", "resnet18", data, shape, left, extra=("--data.transforms=host",),
        name="supervised-resnet18-host-transforms", plain=plain))


THROUGHPUT_ROWS = (("train.compile", ("--train.compile=true",)),
                   ("train.channels_last", ("--train.channels_last=true",)),
                   ("train.compile+channels_last", ("--train.compile=true", "--train.channels_last=true")),
                   ("workers=4", ("--data.num_workers=4",)),
                   ("workers=8", ("--data.num_workers=8",)))
"""The main supervised run again with one throughput setting changed: is a compiled and/or channels-last step
faster than the eager one (the main run), and how does the data-wait fraction move with 4 and 8 DataLoader
workers (the transforms on the GPU, as in the main run). Highest priority first: rows that do not fit are skipped."""


def throughput_rows(check, entry: dict, data: Path, shape: tuple, deadline: float, plain: dict | None) -> None:
    keys = check.train_keys()
    for label, extra in THROUGHPUT_ROWS:
        name, left = f"supervised/resnet18 {label}", deadline - time.monotonic()
        missing = [arg.split("=")[0][2:] for arg in extra if arg.split("=")[0][2:] not in keys]
        if missing:
            entry["items"][name] = {"status": "skipped", "skipped": f"no {missing[0]} key in --print-config"}
        elif not check.cuda:    # a CPU run would measure the CPU's kernels and the workers' share of its cores
            entry["items"][name] = {"status": "skipped", "skipped": "no CUDA"}
        elif left < check.overhead_s + sizes(check).get("min_train_s", 0.0):
            entry["items"][name] = {"status": "skipped", "skipped": f"budget: {left:.0f} s left"}
        else:
            check.report.item(entry, name, lambda item, e=extra, n=name, t=left: engine_run(
                check, item, "supervised", "resnet18", data, shape, min(t, max(t / 3, check.overhead_s + 20)),
                extra=e, name=n.replace("/", "-").replace(" ", "-").replace("+", "-"), plain=plain))
    main_run = entry["items"].get("supervised/resnet18", {}).get("figures", {})
    for label, _ in THROUGHPUT_ROWS:
        row = entry["items"][f"supervised/resnet18 {label}"].get("figures", {})
        if row.get("samples_per_s_steady") and main_run.get("samples_per_s_steady"):
            row["speedup_vs_main_run"] = row["samples_per_s_steady"] / main_run["samples_per_s_steady"]


def headline(items: dict) -> dict:
    """The figures a reader looks for first, per run that produced them."""
    keys = ("samples_per_s_steady", "data_wait_fraction", "step_time_s", "engine_vs_plain_step_ratio",
            "speedup_vs_main_run", "peak_memory_mib")
    return {name: {k: item["figures"][k] for k in keys if k in item["figures"]}
            for name, item in items.items() if item.get("figures", {}).get("samples_per_s_steady")}


def plain_loops(check, runs: list[tuple[str, str]], shape: tuple, timeout_s: float) -> dict[str, dict]:
    """The plain-loop twin of every run, in one probe process: {"stage/encoder": {variant: figures}}. bf16 runs
    get bf16 weights; the main runs also fp32 weights under autocast, for reference."""
    size = sizes(check)
    variants = ["fp32"] if check.precision == "fp32" else ["bf16_weights"]
    models = [{"key": f"{s}/{e}", "stage": s, "encoder": encoder_settings(e),
               "variants": variants + (["autocast_bf16"] if check.precision == "bf16" and (s, e) in MAIN_RUNS
                                       else [])} for s, e in runs]
    args = {"models": models, "shape": list(shape), "batch": size["batch"], "device": check.device,
            "seconds": size["plain_seconds"], "warmup_steps": 1 if check.tiny else 3,
            "min_steps": 2 if check.tiny else 10, "budget_s": max(5.0, timeout_s - 15)}
    result = check.report.run(check.probe("plain-loop", args), timeout_s, check.env,
                              f"plain loops ({len(models)} models)")
    found = result.results()
    plain: dict[str, dict] = {}
    for model in models:
        for variant in model["variants"]:
            plain.setdefault(model["key"], {})[variant] = found.get(f"{model['key']}/{variant}") or {
                "error": f"not reported: plain-loop probe {result.failure()}", "output_tail": tail(result.output, 800)}
    return plain


def engine_run(check, item: dict, stage: str, encoder: str, data: Path | None, shape: tuple, slice_s: float,
               extra: tuple[str, ...] = (), name: str | None = None, plain: dict | None = None) -> None:
    """One `torchrun -m dlscale.train` run sized to `slice_s`, with its plain-loop twin (measured here unless
    `plain` has it already); figures into `item`. `data` None: no --data (a simulation-stream run evaluates on the
    set it simulates)."""
    size = sizes(check)
    start = time.monotonic()
    needed = check.overhead_s + size.get("min_train_s", 0.0)    # start-up + evaluation, and a few s of steps
    if not check.tiny and slice_s < needed:
        item["skipped"] = (f"budget: {slice_s:.0f} s left for this run, needs >= {needed:.0f} s "
                           f"(~{check.overhead_s:.0f} s start-up + evaluation); a second try: --only training with a "
                           "larger --budget-s")
        return
    batch = size["batch"]
    if plain is None:
        plain = plain_loops(check, [(stage, encoder)], shape, timeout_s=max(20.0, 0.3 * slice_s))[f"{stage}/{encoder}"]
    item["plain"] = plain
    base = plain.get("bf16_weights") or plain.get("fp32") or {}
    if check.tiny:
        steps = size["steps"]
    else:
        step_s = base["step_s"] * check.engine_factor if "step_s" in base else DEFAULT_STEP_S
        train_s = 0.85 * (slice_s - (time.monotonic() - start) - check.overhead_s)
        steps = int(min(size["max_steps"], max(20, train_s / step_s)))
    log_every = max(1, steps // 10)
    run_dir = check.work / "runs" / (name or f"{stage}-{encoder}")
    shutil.rmtree(run_dir, ignore_errors=True)
    enc = encoder_settings(encoder)
    args = ["--stage", stage, *(["--data", str(data)] if data else []), "--run-dir", str(run_dir), "--seed=0",
            f"--device={check.device}", f"--deepspeed.precision={check.precision}",
            *(f"--model.encoder.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in enc.items()),
            f"--data.batch_size={batch}", f"--data.num_workers={size['workers']}", "--schedule.epochs=1",
            f"--schedule.batches_per_epoch={steps}", f"--schedule.log_every={log_every}",
            f"--schedule.checkpoint_every={steps + 1000}", f"--optim.warmup_steps={max(1, min(50, steps // 5))}",
            f"--eval.probe_samples={size['probe_samples']}", f"--eval.n_bootstrap={size['n_bootstrap']}", *extra]
    item["settings"] = {"stage": stage, "encoder": enc, "image": list(shape), "batch": batch, "steps": steps,
                        "precision": check.precision, "device": check.device, "num_workers": size["workers"],
                        "command": "torchrun --standalone --nproc_per_node 1 -m dlscale.train " + " ".join(args)}
    sampler = GpuMemorySampler() if check.cuda and shutil.which("nvidia-smi") else None
    if sampler:
        sampler.start()
    left = slice_s - (time.monotonic() - start)
    result = check.report.run(check.train_cmd(args), max(left * 1.5, left + 30), check.env,
                              f"train {name or stage + '/' + encoder}")
    memory = sampler.figures() if sampler else {}
    figures = run_figures(run_dir, result.output, batch)
    if "peak_memory_mib" not in figures and memory:
        figures.update(memory)
    figures["wall_s"] = result.seconds
    if figures.get("samples_per_s"):
        figures["startup_eval_export_s"] = result.seconds - steps * batch / figures["samples_per_s"]
        if result.ok:    # the next runs plan with the largest start-up + evaluation cost seen so far
            check.overheads.append(figures["startup_eval_export_s"])
            check.overhead_s = max(MIN_OVERHEAD_S, *check.overheads)
    if figures.get("step_time_s") and base.get("step_s"):
        figures["engine_vs_plain_step_ratio"] = figures["step_time_s"] / base["step_s"]
        figures["plain_variant"] = base.get("variant")
        if result.ok:    # and with the largest engine/plain step ratio seen (data loading included)
            check.engine_ratios.append(figures["engine_vs_plain_step_ratio"])
            check.engine_factor = max(1.0, *check.engine_ratios)
    item["figures"] = figures
    if not result.ok:
        raise RuntimeError(f"{result.failure()}\n{tail(result.output)}")
