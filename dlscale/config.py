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

import yaml

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


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, values: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise, naming the dotted key."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key {where + unknown[0]!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, where + name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):   # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is tuple and isinstance(value, (list, tuple)):   # YAML has no tuples: [low, high] -> (low, high)
        if len(value) != len(args):
            raise ValueError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin is list and isinstance(value, list) and args:
        return [_coerce(args[0], v, key) for v in value]
    expected = origin or tp
    if expected is Any or isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool)):
        return value
    raise ValueError(f"config key {key!r}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None, **top: Any) -> Config:
    """The training config: defaults < YAML file < dotted overrides (`section.key=value`) < keyword arguments."""
    return load_dataclass(Config(), yaml_path, overrides, **top)


def load_dataclass(defaults: Any, yaml_path: str | Path | None = None, overrides: list[str] | None = None,
                   **top: Any) -> Any:
    """Any typed config tree: `defaults` (an instance) < YAML file < dotted overrides (values parsed as YAML)
    < keyword arguments; unknown keys and wrong types raise naming the dotted key."""
    tree = to_dict(defaults)
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a YAML mapping at the top level")
        tree = _merge(tree, loaded)
    for item in overrides or []:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected --section.key=value")
        update: dict = {}
        if not key or key.startswith("-"):
            raise ValueError(f"override {item!r}: expected --section.key=value")
        set_dotted(update, key, yaml.safe_load(raw))
        tree = _merge(tree, update)
    tree.update({k: v for k, v in top.items() if v is not None})
    return from_dict(type(defaults), tree)


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False))


def plain(tree: Any) -> Any:
    """Tuples as lists, recursively, so the tree dumps as plain YAML/JSON and loads back unchanged."""
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [plain(v) for v in tree]
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
