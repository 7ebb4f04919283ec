"""The GPU check's in-process measurements, each run by check.py as a child process of its own:

    python bench/gpu/probes.py env '{}'
    python bench/gpu/probes.py simulator '{"device": "cuda", "batches": {"model_i": 1024}, "seconds": 2}'
    python bench/gpu/probes.py plain-loop '{"models": [{"key": "supervised/resnet18", "stage": ...}], ...}'

Each result is printed as soon as it exists, one line `@@gpu-check {"name": ..., ...}`, so a probe that hangs or
crashes later still hands over what it measured. A failing measurement prints {"name": ..., "error": ...} and the
probe goes on with the next one.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

RESULT_PREFIX = "@@gpu-check "
MIB = 2 ** 20


def emit(name: str, fn: Callable[[], dict]) -> dict | None:
    try:
        result = {"name": name, **fn()}
    except Exception as err:  # noqa: BLE001 - reported, the probe goes on
        result = {"name": name, "error": f"{type(err).__name__}: {err}",
                  "traceback": "".join(traceback.format_exception(err))[-2000:]}
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return None if "error" in result else result


# ---- 1. environment ---------------------------------------------------------------------------------------------

def torch_info() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
            "cpu_count": os.cpu_count(), "cudnn": torch.backends.cudnn.version()}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), bf16_supported=torch.cuda.is_bf16_supported(),
                    nccl=nccl_version())
    return info


def nccl_version() -> str | None:
    try:
        import torch.cuda.nccl
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a torch without NCCL: the process-group check says more
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def bf16_matmul() -> dict:
    """bf16 actually computes on the device (not only "supported"): a matmul against its fp32 value."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(512, 512, device=device)
    exact = a @ a
    approx = (a.bfloat16() @ a.bfloat16()).float()
    error = ((approx - exact).abs().max() / exact.abs().max()).item()
    return {"device": device, "relative_error": error, "ok": error < 0.05}


def process_group() -> dict:
    """A world of one without a launcher: init_process_group on a file store, one all_reduce, destroy. NCCL on a GPU
    (the backend DeepSpeed uses there), gloo on CPU."""
    import datetime

    import torch
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    store = tempfile.NamedTemporaryFile(prefix="gpu-check-store-", delete=False)
    store.close()
    os.unlink(store.name)
    start = time.perf_counter()
    kwargs = {"device_id": torch.device("cuda", 0)} if cuda else {}
    if cuda:
        torch.cuda.set_device(0)
    try:
        dist.init_process_group(backend, init_method=f"file://{store.name}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60), **kwargs)
    except TypeError:   # a torch without device_id
        dist.init_process_group(backend, init_method=f"file://{store.name}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    init_s = time.perf_counter() - start
    value = torch.full((4,), 3.0, device="cuda" if cuda else "cpu")
    dist.all_reduce(value)
    dist.barrier()
    ok = bool((value == 3.0).all())
    dist.destroy_process_group()
    if os.path.exists(store.name):
        os.unlink(store.name)
    return {"backend": backend, "init_method": "file store", "world_size": 1, "init_s": init_s, "all_reduce_ok": ok,
            "total_s": time.perf_counter() - start}


def deepspeed_import() -> dict:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    return {"version": deepspeed.__version__, "import_s": time.perf_counter() - start,
            "accelerator": get_accelerator().device_name(), "path": os.path.dirname(deepspeed.__file__)}


def dlscale_info() -> dict:
    import importlib

    import dlscale
    info: dict = {"path": os.path.dirname(dlscale.__file__)}
    try:
        info["encoders"] = list(importlib.import_module("dlscale.models").ENCODER_NAMES)
    except Exception as err:  # noqa: BLE001
        info["encoders_error"] = f"{type(err).__name__}: {err}"
    return info


def package_versions() -> dict:
    from importlib import metadata
    names = ("deepspeed", "webdataset", "pydantic", "pydantic_core", "timm", "torchvision", "tensorboard", "numpy",
             "scikit-learn", "typing_extensions", "ninja", "psutil")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def env_probe(_: dict) -> None:
    emit("torch", torch_info)
    emit("bf16", bf16_matmul)
    emit("process_group", process_group)
    emit("dlscale", dlscale_info)
    emit("packages", package_versions)
    emit("deepspeed", deepspeed_import)    # last: it may set up logging and accelerator state


# ---- 2. simulator -----------------------------------------------------------------------------------------------

def simulator_classes():
    try:
        from dlscale.sim import LensSimulator, preset_config
        where = "dlscale.sim"
    except ImportError:
        from dlscale.data.simulate import LensSimulator, preset_config
        where = "dlscale.data.simulate"
    return LensSimulator, preset_config, where


def simulate_rate(sim, class_name: str, batch: int, seconds: float, render_only: bool) -> tuple[float, int, int]:
    """images/s of `sim` on one class: end to end (`simulate`: to host numpy + metadata), or `render_only`
    (parameters, rendering and noise, on the device). Returns (rate, images timed, peak device bytes)."""
    import torch
    params_gen, noise_gen = sim.generators(0)
    cuda = sim.device.type == "cuda"

    def step() -> None:
        if render_only:
            params = sim.sample(class_name, batch, params_gen)
            sim.add_noise(sim.render(params), params, noise_gen)
        else:
            sim.simulate(class_name, batch, params_gen, noise_gen)

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < seconds:
        step()
        done += batch
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return done / elapsed, done, torch.cuda.max_memory_allocated() if cuda else 0


def simulator_probe(args: dict) -> None:
    """Per preset and class: images/s on the device at a large batch (end to end and render only), peak memory, the
    time for 10^6 images; the same physics on the CPU in this process with one thread and a small batch."""
    import torch
    LensSimulator, preset_config, where = simulator_classes()
    device, seconds = args["device"], args["seconds"]
    for preset, batch in args["batches"].items():
        gpu_sim = LensSimulator(preset_config(preset), device)
        cpu_sim = LensSimulator(preset_config(preset), "cpu")
        n_pix = gpu_sim.config.instrument.n_pix
        for class_name in ("no_sub", "cdm", "axion"):
            def measure() -> dict:
                rate, n, peak = simulate_rate(gpu_sim, class_name, batch, seconds, render_only=False)
                render, _, render_peak = simulate_rate(gpu_sim, class_name, batch, seconds, render_only=True)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    cpu_rate, cpu_n, _ = simulate_rate(cpu_sim, class_name, args["cpu_batch"], args["cpu_seconds"],
                                                       render_only=False)
                finally:
                    torch.set_num_threads(threads)
                return {"preset": preset, "class": class_name, "image": [1, n_pix, n_pix], "device": str(device),
                        "batch": batch, "images_per_s": rate, "render_images_per_s": render,
                        "seconds_per_1e6_images": 1e6 / rate, "render_seconds_per_1e6_images": 1e6 / render,
                        "peak_memory_mib": max(peak, render_peak) / MIB, "images_timed": n,
                        "cpu_1thread_images_per_s": cpu_rate, "cpu_batch": args["cpu_batch"],
                        "cpu_images_timed": cpu_n, "speedup_vs_cpu_1thread": rate / cpu_rate,
                        "simulator_module": where}
            emit(f"{preset}/{class_name}", measure)


# ---- 3. plain PyTorch loop ----------------------------------------------------------------------------------------

def build_model(stage: str, encoder: dict, shape: tuple[int, ...]):
    """The model the engine trains for `stage`, built by dlscale (wherever the refactoring has put build_model)."""
    import importlib

    from dlscale.models import EncoderConfig
    cfg = EncoderConfig(**encoder)
    for module in ("dlscale.train.model", "dlscale.models"):
        try:
            builder = importlib.import_module(module).build_model
        except (ImportError, AttributeError):
            continue
        return builder(stage, cfg, shape), f"{module}.build_model"
    raise ImportError("no build_model in dlscale.train.model or dlscale.models")


def forward_loss(model, x, labels):
    """One training forward and its loss, as the engine does it: model(images, batch) and the model's own task
    losses (summed, unweighted); for a model without `losses`, reconstruction MSE + cross-entropy of its outputs."""
    if hasattr(model, "losses"):
        batch = {"image": x, "label": labels}
        out = model(x, batch)
        return sum(v.float() for v in model.losses(out, x, batch).values())
    return plain_loss(model(x), x, labels)


def plain_loss(out, images, labels):
    """Reconstruction MSE + cross-entropy for the outputs the model has."""
    import torch.nn.functional as F
    outputs = out if isinstance(out, dict) else {"logits": out}
    loss = 0.0
    if "recon" in outputs:
        loss = loss + F.mse_loss(outputs["recon"].float(), images.float())
    if "logits" in outputs:
        loss = loss + F.cross_entropy(outputs["logits"].float(), labels)
    if isinstance(loss, float):   # neither: keep every output in the graph
        loss = sum(v.float().mean() for v in outputs.values() if hasattr(v, "float"))
    return loss


def plain_loop_probe(args: dict) -> None:
    """Each model of `args["models"]` as the engine would train it, in a plain PyTorch loop: AdamW (fused on CUDA),
    gradient clipping 1.0, one host copy of the loss per step (as the engine's NaN check), synthetic data already on
    the device, the same batch. Variants: `fp32`; `bf16_weights` (what DeepSpeed's bf16 mode computes with);
    `autocast_bf16` (fp32 weights under autocast). One process for all: one CUDA start-up."""
    import torch
    device = torch.device(args["device"])
    shape, batch = tuple(args["shape"]), args["batch"]
    images = torch.rand(batch, *shape, device=device)
    labels = torch.randint(0, 3, (batch,), device=device)
    start = time.perf_counter()
    for spec in args["models"]:
        for variant in spec["variants"]:
            if time.perf_counter() - start > args.get("budget_s", float("inf")):
                print(RESULT_PREFIX + json.dumps({"name": f"{spec['key']}/{variant}", "skipped": (
                    f"budget: the plain-loop probe's {args['budget_s']:.0f} s were used by the models before")}),
                    flush=True)
                continue
            emit(f"{spec['key']}/{variant}", lambda: time_plain_loop(spec, variant, images, labels, args))


def time_plain_loop(spec: dict, variant: str, images, labels, args: dict) -> dict:
    import torch
    device = images.device
    torch.manual_seed(0)
    model, builder = build_model(spec["stage"], spec["encoder"], tuple(images.shape[1:]))
    model = model.to(device)
    x = images
    if variant == "bf16_weights":
        model, x = model.to(torch.bfloat16), images.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "autocast_bf16")

    def step() -> float:
        with autocast:
            loss = forward_loss(model, x, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    for _ in range(args["warmup_steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps, start = 0, time.perf_counter()
    while steps < args["min_steps"] or time.perf_counter() - start < args["seconds"]:
        step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else None
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"variant": variant, "step_s": step_s, "samples_per_s": len(x) / step_s, "steps_timed": steps,
            "peak_memory_mib": peak, "model_from": builder}


PROBES = {"env": env_probe, "simulator": simulator_probe, "plain-loop": plain_loop_probe}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in PROBES:
        print(__doc__, file=sys.stderr)
        return 2
    if os.environ.get("GPU_CHECK_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["GPU_CHECK_THREADS"]))
    PROBES[argv[0]](json.loads(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
