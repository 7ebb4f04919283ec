"""Everything DeepSpeed-specific in one place: process group start, ds_config generation, engine creation."""
from __future__ import annotations

import atexit
import json
import logging
import math
from pathlib import Path

import torch

from dlscale.distributed import DistInfo, export_env, set_env
from dlscale.models import layer_groups

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    """auto -> cuda when a GPU is visible, else cpu."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no GPU is visible; use device=cpu or auto")
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def prepare_process(requested_device: str = "auto") -> torch.device:
    """Once per process, at its entry point, before DeepSpeed is imported: choose DeepSpeed's accelerator (the CPU
    one where there is no GPU) and skip its CPU shared-memory op build. Returns the device."""
    device = pick_device(requested_device)
    if device.type == "cpu":
        set_env("DS_ACCELERATOR", "cpu")
        _skip_cpu_shm_build()
    return device


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Start (or join) the process group: nccl on GPUs, gloo on CPU. Works under torchrun, the deepspeed launcher,
    SLURM (srun) and Ray Train (which has already created the group); a bare `python` run is a world of one."""
    import deepspeed
    if torch.distributed.is_initialized():   # Ray Train, or an earlier run in this process: join it
        deepspeed.init_distributed(auto_mpi_discovery=False)
        return
    export_env(info)
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    atexit.register(_destroy_group)


def _destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _skip_cpu_shm_build() -> None:
    """The one DeepSpeed work-around (checked against deepspeed 0.19): DeepSpeed >= 0.14 JIT-compiles
    `deepspeed_shm_comm` (70-90 s of g++) at its first CPU process group. It only speeds up inference all-reduce,
    which dlscale never uses, so mark it incompatible before the group starts."""
    import deepspeed.ops
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def resolve_precision(cfg, device: torch.device) -> str:
    precision = cfg.deepspeed.precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("deepspeed.precision=fp16 is not supported on CPU; use fp32 (or bf16, 5-8x slower here)")
    return precision


def ds_config(cfg, world: int, precision: str) -> dict:
    """The ds_config for this run: from `deepspeed.config_file` if given, else generated from the YAML."""
    micro, accum = cfg.data.batch_size, cfg.deepspeed.grad_accum
    if cfg.deepspeed.config_file:
        path = Path(cfg.deepspeed.config_file)
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed.config_file {path} not found")
        out = json.loads(path.read_text())
        out.pop("train_batch_size", None)   # derived from micro batch x accumulation x world, never hard-coded
        if out.setdefault("train_micro_batch_size_per_gpu", micro) != micro:
            raise ValueError(f"{path}: train_micro_batch_size_per_gpu={out['train_micro_batch_size_per_gpu']} "
                             f"but data.batch_size={micro}; make them agree")
        out.setdefault("gradient_accumulation_steps", accum)
        if "optimizer" in out or "scheduler" in out:
            raise ValueError(f"{path}: remove 'optimizer'/'scheduler'; dlscale passes torch AdamW and its schedule")
        return out
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def resolve_engine_settings(cfg, world: int, device: torch.device) -> dict:
    """The ds_config the engine will run with, and `cfg.deepspeed` set to what it holds (precision, ZeRO stage,
    gradient accumulation): a `deepspeed.config_file` decides them, and the learning-rate schedule, batch casts,
    resume position, logs and config.yaml must all use what DeepSpeed uses. Called once, before the run directory
    is written; raises naming the key or file for a value dlscale cannot run."""
    config = ds_config(cfg, world, resolve_precision(cfg, device))
    where = cfg.deepspeed.config_file or "the generated ds_config"
    resolved = {"precision": "bf16" if (config.get("bf16") or {}).get("enabled") else
                "fp16" if (config.get("fp16") or {}).get("enabled") else "fp32",
                "zero_stage": int((config.get("zero_optimization") or {}).get("stage", 0)),
                "grad_accum": int(config.get("gradient_accumulation_steps", 1))}
    if resolved["zero_stage"] not in (0, 1, 2):
        raise ValueError(f"{where}: zero_optimization.stage={resolved['zero_stage']}; dlscale runs stages 0-2 "
                         "(stage 3 would shard parameters the uneven evaluation stream needs)")
    if resolved["grad_accum"] < 1:
        raise ValueError(f"{where}: gradient_accumulation_steps={resolved['grad_accum']}; expected >= 1")
    if device.type == "cpu" and resolved["precision"] == "fp16":
        raise ValueError(f"{where}: fp16 is not supported on CPU; use fp32 (or bf16, 5-8x slower here)")
    for key, value in resolved.items():
        said = getattr(cfg.deepspeed, key)
        if said != value and not (key == "precision" and said == "auto"):
            log.warning("%s sets deepspeed.%s=%s (the config said %s): using %s throughout", where, key, value, said,
                        value)
        setattr(cfg.deepspeed, key, value)
    return config


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model: torch.nn.Module, cfg, fused: bool = False) -> torch.optim.AdamW:
    """AdamW of `cfg.optim`. The encoder's parameters learn at `optim.encoder_lr_scale` x lr, its layer group at
    depth d from the output at a further `optim.layer_decay`^d (groups: each backbone's, `dlscale.models.layer_groups`); its
    first `optim.freeze_stages` groups are frozen here (requires_grad off, left out of the optimiser). With the
    defaults there is one group, as checkpoints before these options hold."""
    o = cfg.optim
    if o.encoder_lr_scale <= 0:
        raise ValueError(f"optim.encoder_lr_scale={o.encoder_lr_scale}: expected a multiple of optim.lr > 0")
    params: list = [p for p in model.parameters() if p.requires_grad]   # (LoRA freezes the encoder's own weights)
    if o.encoder_lr_scale == 1.0 and o.layer_decay == 1.0 and o.freeze_stages == 0:
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused)
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise ValueError("optim.encoder_lr_scale / layer_decay / freeze_stages: this model has no encoder to give "
                         "its own learning rate")
    layers = encoder_layers(encoder, cfg)
    if o.freeze_stages > len(layers):
        raise ValueError(f"optim.freeze_stages={o.freeze_stages}: encoder {cfg.model.encoder.name} has "
                         f"{len(layers)} layer groups")
    for layer in layers[:o.freeze_stages]:
        for p in layer:
            p.requires_grad_(False)
    mine = {id(p) for p in encoder.parameters()}
    groups = [{"params": [p for p in layer if p.requires_grad],
               "lr": o.lr * o.encoder_lr_scale * o.layer_decay ** (len(layers) - i)}
              for i, layer in enumerate(layers) if i >= o.freeze_stages]
    if o.layer_decay == 1.0:   # one encoder group, as before layer-wise decay
        groups = [{"params": [p for g in groups for p in g["params"]], "lr": o.lr * o.encoder_lr_scale}]
    groups = [g for g in groups if g["params"]]
    groups.append({"params": [p for p in params if id(p) not in mine], "lr": o.lr})
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused)


def encoder_layers(encoder: torch.nn.Module, cfg) -> list[list[torch.nn.Parameter]]:
    """The encoder's parameters in its layer groups, input to output (one group when neither layer-wise decay nor
    freezing asks for them, so any backbone takes `optim.encoder_lr_scale`)."""
    if cfg.optim.layer_decay == 1.0 and cfg.optim.freeze_stages == 0:
        return [list(encoder.parameters())]
    named = dict(encoder.named_parameters())
    return [[named[n] for n in group] for group in layer_groups(encoder)]


def make_engine(model: torch.nn.Module, cfg, world: int, device: torch.device, total_steps: int):
    """Wrap the model in a DeepSpeed engine with torch AdamW (fused on CUDA) and warm-up + cosine schedule; its forward
    compiled when `train.compile` asks."""
    import deepspeed
    precision = resolve_precision(cfg, device)
    config = ds_config(cfg, world, precision)
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    if cfg.train.compile:
        engine.compile()   # nn.Module.compile in place: state dict keys and checkpoints stay as in eager runs
    return engine, precision, config
