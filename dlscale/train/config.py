"""Typed configuration tree: defaults < YAML file < `--section.key=value` overrides, validated once.

The resolved tree is written to the run directory as config.yaml and reloads unchanged (`load_config`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlscale.configtree import dump_yaml, flatten, from_dict, load_dataclass, plain, set_dotted, to_dict  # noqa: F401
from dlscale.data.stream import StreamConfig
from dlscale.models import EncoderConfig

STAGES = ("autoencoder", "supervised", "multitask")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="resnet18"))
    tasks: list[str] | None = None        # multitask heads; default recon + classification (+ regression if targets)
    classifier_dropout: float = 0.0


@dataclass
class LossConfig:
    method: str = "fixed"                 # fixed | uncertainty (Kendall et al. 2018) | dwa (Liu et al. 2019)
    weights: dict[str, float] | None = None   # fixed only: per task, e.g. {recon: 0.1, classification: 1.0}
    temperature: float = 2.0              # dwa only


@dataclass
class OptimConfig:
    lr: float = 1e-3                      # peak learning rate of AdamW
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50                # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0                # global gradient-norm clip (0 = off)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1                   # 0, 1 or 2 (stage 3 shards parameters; eval streams are uneven, see DESIGN)
    precision: str = "auto"               # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16
    grad_accum: int = 1                   # gradient accumulation steps
    config_file: str | None = None        # a ds_config JSON used as is (its batch sizes must agree with data.*)


@dataclass
class ScheduleConfig:
    epochs: int = 10
    batches_per_epoch: int | None = None  # per rank; default: the train split once per epoch
    log_every: int = 20                   # steps between log lines / TensorBoard scalars
    checkpoint_every: int = 500           # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2             # newest checkpoints kept on disk (older tags are deleted)
    eval_every_epochs: int = 0            # 0 = evaluate only at the end


@dataclass
class EvalConfig:
    split: str = "val"
    probe_samples: int = 4096             # train samples whose frozen features fit the linear probe
    n_bootstrap: int = 200                # resamples for the macro-AUC 95% CI


@dataclass
class Config:
    stage: str = "supervised"             # autoencoder | supervised | multitask
    data_dir: str = ""                    # dataset directory (manifest.json + shards)
    run_dir: str = ""                     # output directory of this run
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda
    init_from: str | None = None          # encoder.pt or a run directory whose encoder starts this run
    data: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")
        if self.deepspeed.zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage={self.deepspeed.zero_stage}: expected 0, 1 or 2")
        if self.deepspeed.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"deepspeed.precision={self.deepspeed.precision!r}: expected auto, fp32, bf16 or fp16")
        if self.schedule.epochs < 1 or self.deepspeed.grad_accum < 1:
            raise ValueError("schedule.epochs and deepspeed.grad_accum must be >= 1")
        if not self.data_dir or not self.run_dir:
            raise ValueError("data_dir (--data) and run_dir (--run-dir) are required")
        return self


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None, **top: Any) -> Config:
    """The training config: defaults < YAML file < dotted overrides (`section.key=value`) < keyword arguments."""
    return load_dataclass(Config(), yaml_path, overrides, **top)


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(dump_yaml(cfg))
