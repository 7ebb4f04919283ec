"""The training config schema: a tree of typed dataclasses, loaded as defaults < stage defaults < YAML file <
`--section.key=value` overrides, validated once, written into the run directory as config.yaml.

The loader itself is generic (`dlscale.configtree`); this module holds only the training schema and the
translation of config files written by dlscale 0.1 (their `loss.weights`, `loss.temperature` and
`model.encoder.weights_path` keys), so old run directories still load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlscale.configtree import from_dict, merge, overrides_tree, read_yaml, to_dict
from dlscale.data.stream import StreamConfig
from dlscale.models import EncoderConfig
from dlscale.preemption import DEFAULT_SIGNALS, signal_number
from dlscale.sim.stream import SimulationSourceConfig
from dlscale.train.stages import STAGES, get_stage
from dlscale.train.weighting import build_weighting, weighting_class
from dlscale.train.weighting.classic import DWAConfig, FixedConfig
from dlscale.train.weighting.famo import FAMOConfig


SOURCES = ("shards", "simulate")


@dataclass
class DataConfig(StreamConfig):
    """Where training batches come from, and how they are made (the stream fields)."""
    source: str = "shards"
    """shards: the dataset in `data_dir`; simulate: fresh simulated lenses every step (`data.simulator`), an epoch
    being `schedule.batches_per_epoch` batches; evaluation then uses `data_dir` if given, else a fixed set simulated
    once into RUN/eval_data."""
    simulator: SimulationSourceConfig = field(default_factory=SimulationSourceConfig)


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="resnet18"))
    tasks: list[str] | None = None
    """Tasks of stages that let the run choose (multitask); default recon + classification (+ regression if
    data.targets)."""
    classifier_dropout: float = 0.0
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-task options, e.g. {mae: {mask_ratio: 0.6}} (each task's `Config` lists its fields)."""


@dataclass
class LossConfig:
    method: str = "fixed"
    """fixed | uncertainty (Kendall et al. 2018) | dwa (Liu et al. 2019) | famo (Liu et al. 2023) | upgrad
    (Quinton & Rey 2024, gradient-based) | any registered weighting."""
    fixed: FixedConfig = field(default_factory=FixedConfig)
    dwa: DWAConfig = field(default_factory=DWAConfig)
    famo: FAMOConfig = field(default_factory=FAMOConfig)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options of weightings registered outside dlscale: {method: {field: value}}."""

    def method_options(self) -> Any:
        """The options of the chosen method (its config section)."""
        return getattr(self, self.method) if hasattr(self, self.method) and self.method != "options" \
            else self.options.get(self.method)


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
    zero_stage: int = 1                   # 0, 1 or 2 (stage 3 would shard parameters the uneven eval stream needs)
    precision: str = "auto"               # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16
    grad_accum: int = 1                   # gradient accumulation steps
    config_file: str | None = None        # a ds_config JSON used as is (its batch sizes must agree with data.*)


@dataclass
class ScheduleConfig:
    epochs: int = 10
    batches_per_epoch: int | None = None  # per rank; default: the train split once per epoch
    log_every: int = 20                   # steps between log lines / TensorBoard scalars: the host reads the losses
    #                                       (non-finite check, stop signals) only then, never inside a step
    checkpoint_every: int = 500           # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2             # newest checkpoints kept on disk (older tags are deleted)
    eval_every_epochs: int = 0            # 0 = evaluate only at the end
    preempt_signals: list[str] = field(default_factory=lambda: list(DEFAULT_SIGNALS))
    """Signals that stop the run cleanly (SLURM, Kubernetes and spot instances send SIGTERM; SLURM's `--signal`
    another): the ranks train on to the next logging interval, a complete checkpoint is written and they exit with 75
    (`dlscale.preemption.PREEMPTED_EXIT_CODE`); `--resume auto` continues. [] keeps the default handling (death)."""


@dataclass
class EvalConfig:
    split: str = "val"
    probe_samples: int = 4096             # train samples whose frozen features fit the linear probe
    n_bootstrap: int = 200                # resamples for the macro-AUC 95% CI
    calibration_split: str | None = None  # fit a softmax temperature on this split (never the scored one) and report
    #                                       the scored split's ECE and NLL with it (`<split>/ece_calibrated`)


@dataclass
class Config:
    stage: str = "supervised"             # a name of the stage table (dlscale.train.stages)
    data_dir: str = ""                    # dataset directory (manifest.json + shards)
    run_dir: str = ""                     # output directory of this run
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda
    init_from: str | None = None          # encoder.pt, a run directory or an encoder state dict to start from
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        get_stage(self.stage)
        weighting_class(self.loss.method)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")
        if self.deepspeed.zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage={self.deepspeed.zero_stage}: expected 0, 1 or 2")
        if self.deepspeed.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"deepspeed.precision={self.deepspeed.precision!r}: expected auto, fp32, bf16 or fp16")
        if self.schedule.epochs < 1 or self.deepspeed.grad_accum < 1:
            raise ValueError("schedule.epochs and deepspeed.grad_accum must be >= 1")
        if self.data.source not in SOURCES:
            raise ValueError(f"data.source={self.data.source!r}: expected one of {', '.join(SOURCES)}")
        if self.data.source == "simulate" and not self.schedule.batches_per_epoch:
            raise ValueError("data.source=simulate: set schedule.batches_per_epoch (an epoch of fresh simulated "
                             "lenses has no natural length)")
        if (self.data.source == "simulate" and not self.data_dir and self.data.simulator.probe_per_class == 0
                and self.eval.probe_samples > 0):
            raise ValueError("data.simulator.probe_per_class=0 leaves the simulated evaluation set without a train "
                             "split for the linear probe: set eval.probe_samples=0 or probe_per_class > 0")
        if self.eval.calibration_split is not None and self.eval.calibration_split == self.eval.split:
            raise ValueError(f"eval.calibration_split={self.eval.calibration_split!r} is the scored split "
                             "(eval.split): a temperature fitted on the split it is scored on flatters it; "
                             "name another split (e.g. test) or null")
        for name in self.schedule.preempt_signals:
            try:
                signal_number(name)
            except ValueError as err:
                raise ValueError(f"schedule.preempt_signals: {err}") from None
        if not self.run_dir or (not self.data_dir and self.data.source == "shards"):
            raise ValueError("data_dir (--data) and run_dir (--run-dir) are required")
        return self


def run_tasks(cfg: Config) -> tuple[str, ...]:
    """The tasks a run of this config trains."""
    from dlscale.train.stages import stage_tasks
    return stage_tasks(cfg.stage, cfg.model.tasks, len(cfg.data.targets))


def check_weighting(cfg: Config) -> None:
    """Build the configured weighting once for the run's tasks: bad options raise here, before anything starts."""
    build_weighting(cfg.loss.method, run_tasks(cfg), cfg.loss.method_options())


def migrate(tree: dict) -> dict:
    """Config trees written by dlscale 0.1 in today's form (only keys present are moved). A resolved 0.1
    config.yaml (it has loss.weights, loss.temperature and model.encoder.weights_path) also selects 0.1's
    reconstruction head, so the run's model.pt loads."""
    loss, model = tree.get("loss"), tree.get("model") or {}
    encoder = model.get("encoder")
    if (isinstance(loss, dict) and {"weights", "temperature"} <= set(loss) and isinstance(encoder, dict)
            and "weights_path" in encoder and "task_options" not in model):
        model["task_options"] = {task: options for task, options in (("classification", {"standardize": False}),
                                                                     ("recon", {"decoder": "wide"}))
                                 if _trained_in_01(tree, task)}
    if isinstance(loss, dict):
        if "weights" in loss:
            loss.setdefault("fixed", {})["weights"] = loss.pop("weights")
        if "temperature" in loss:
            loss.setdefault("dwa", {})["temperature"] = loss.pop("temperature")
    if isinstance(encoder, dict) and "weights_path" in encoder:   # 0.1's second way to start an encoder
        path = encoder.pop("weights_path")
        if path and not tree.get("init_from"):
            tree["init_from"] = path
    return tree


def _trained_in_01(tree: dict, task: str) -> bool:
    """Whether a dlscale 0.1 config trains `task` (0.1's stages: autoencoder, supervised, multitask)."""
    stage, tasks = tree.get("stage"), (tree.get("model") or {}).get("tasks")
    return stage == {"recon": "autoencoder", "classification": "supervised"}[task] or (
        stage == "multitask" and (tasks is None or task in tasks))


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None, **top: Any) -> Config:
    """The training config: defaults < the stage's defaults < YAML file < dotted overrides (`section.key=value`)
    < keyword arguments (None: not given). Unknown keys and wrong types raise naming the dotted key."""
    given = migrate(read_yaml(yaml_path)) if yaml_path else {}
    given = merge(given, migrate(overrides_tree(overrides)))
    given.update({k: v for k, v in top.items() if v is not None})
    stage = given.get("stage", Config.stage)
    stage_defaults = STAGES[stage].defaults if isinstance(stage, str) and stage in STAGES else {}
    return from_dict(Config, merge(merge(to_dict(Config()), stage_defaults), given))
