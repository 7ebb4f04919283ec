"""Parts 1, 2 and 4 of the GPU check: the environment, the simulator on CUDA, the simulation stream feeding
training. Part 3 (training) is in training.py, part 5 (the shortened quickstart) in quickstart_chain.py."""
from __future__ import annotations

import shutil
import subprocess
import time

from harness import tail
from training import engine_run, headline

ENV_RESULTS = ("torch", "bf16", "process_group", "dlscale", "packages", "deepspeed")


def with_status(found: dict | None, result) -> dict:
    """A probe's result as an item; one the probe never printed is an error naming how the probe ended."""
    if found is None:
        return {"status": "error", "error": f"not reported: {result.failure()}",
                "output_tail": tail(result.output, 1500)}
    return {"status": "error" if "error" in found else "ok", **found}


def nvidia_smi() -> dict:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_mode,memory.total,memory.used",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    if out.returncode:
        raise RuntimeError(f"nvidia-smi exit {out.returncode}: {tail(out.stderr or out.stdout, 500)}")
    names = ("name", "driver_version", "compute_mode", "memory_total", "memory_used")
    return {"gpus": [dict(zip(names, (v.strip() for v in line.split(",")))) for line in out.stdout.splitlines()]}


def environment_part(check, entry: dict, slice_s: float) -> None:
    """Device, versions, bf16, a launcher-free process group (NCCL on a GPU), deepspeed importing: in one probe
    process whose results arrive one by one."""
    # at least 60 s: a cold machine's first CUDA context, NCCL communicator and deepspeed import add up
    result = check.report.run(check.probe("env", {}), max(60.0, slice_s), check.env, "environment probe")
    found = result.results()
    for name in ENV_RESULTS:
        entry.setdefault("items", {})[name] = with_status(found.get(name), result)
    torch_item = found.get("torch") or {}
    if "cuda_available" in torch_item:
        check.cuda = bool(torch_item["cuda_available"])
    else:
        check.cuda = check.detect_cuda()
    check.encoders = (found.get("dlscale") or {}).get("encoders")
    if shutil.which("nvidia-smi"):
        check.report.item(entry, "nvidia_smi", lambda item: item.update(nvidia_smi()))
    entry["items"]["repository"] = {"status": "ok", "git": check.git_description(), "root": str(check.root)}
    entry["figures"] = {"cuda": check.cuda, "device": check.device, "precision": check.precision,
                        "device_name": torch_item.get("device_name"), "torch": torch_item.get("torch"),
                        "deepspeed": (found.get("deepspeed") or {}).get("version")}
    check.configure_children()


def simulator_part(check, entry: dict, slice_s: float) -> None:
    """images/s per preset and class on the device at a large batch, and in one CPU thread at a small one."""
    if not check.cuda and not check.tiny:
        entry["skipped"] = "no CUDA"
        return
    if check.tiny:
        args = {"batches": {"model_i": 4, "model_ii": 8}, "seconds": 0.05, "cpu_batch": 4, "cpu_seconds": 0.05}
    else:   # 6 figure groups of 3 timings each, plus start-up and warm-up steps
        seconds = min(4.0, max(0.5, 0.75 * (slice_s - 20) / 18))
        args = {"batches": {"model_i": 1024, "model_ii": 4096}, "seconds": seconds, "cpu_batch": 32,
                "cpu_seconds": seconds}
    args["device"] = check.device
    entry["settings"] = {**args, "float": "float32", "cpu": "the same process, torch.set_num_threads(1)",
                         "images_per_s": "LensSimulator.simulate end to end (parameters, render, noise, host numpy, "
                                         "metadata)", "render_images_per_s": "sample + render + add_noise, on the "
                                                                             "device"}
    result = check.report.run(check.probe("simulator", args), max(40.0, slice_s + 30), check.env, "simulator probe")
    found = result.results()
    for preset in args["batches"]:
        for class_name in ("no_sub", "cdm", "axion"):
            key = f"{preset}/{class_name}"
            entry.setdefault("items", {})[key] = with_status(found.get(key), result)
    rates = [v for v in found.values() if "images_per_s" in v]
    if rates:
        entry["figures"] = {"slowest_images_per_s": min(v["images_per_s"] for v in rates),
                            "slowest": min(rates, key=lambda v: v["images_per_s"])["class"],
                            "max_seconds_per_1e6_images": max(v["seconds_per_1e6_images"] for v in rates)}


def sim_stream_part(check, entry: dict, slice_s: float) -> None:
    """Training fed by the simulator (`--data.source=simulate`), when the training config has that key."""
    keys = check.train_keys()
    if "data.source" not in keys:
        entry["skipped"] = "no data.source key in `python -m dlscale.train --help` / --print-config"
        return
    if not check.cuda:
        entry["skipped"] = "no CUDA"
        return
    extra = ["--data.source=simulate"]
    wanted = {"preset": "model_ii", "device": check.device, "eval_per_class": 50 if check.tiny else 300,
              "probe_per_class": 30 if check.tiny else 200}
    extra += [f"--data.simulator.{k}={v}" for k, v in wanted.items() if f"data.simulator.{k}" in keys]
    entry["settings"] = {"overrides": extra, "data": "none: the run simulates its evaluation set (RUN/eval_data)",
                         "data_keys_seen": sorted(k for k in keys if k.startswith("data."))}
    start = time.monotonic()
    check.report.item(entry, "supervised/resnet18", lambda item: engine_run(
        check, item, "supervised", "resnet18", None, (1, 64, 64), slice_s - (time.monotonic() - start),
        tuple(extra), name="sim-stream-supervised-resnet18"))
    entry["figures"] = headline(entry["items"])
