"""The training config schema: a tree of typed dataclasses, loaded as defaults < stage defaults < YAML file <
`--section.key=value` overrides, validated once, written into the run directory as config.yaml.

The loader itself is generic (`dlscale.configtree`); this module holds only the training schema. The options of
tasks (`model.task_options.<task>`) and of weightings registered outside dlscale (`loss.options.<method>`) are
typed sections built from the registries at load; config files of earlier versions are translated by
`dlscale.compat` (keyed by `format_version`), so old run directories still load. What the config alone decides is
checked by `Config.validate`; what needs the data or the machine by `dlscale.train.preflight`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dlscale.configtree import commented_yaml, from_dict, merge, merge_overrides, read_yaml, rehomed, to_dict
from dlscale.data.stream_config import StreamConfig
from dlscale.models import EncoderConfig
from dlscale.models.adapters import LoRAConfig
from dlscale.preemption import DEFAULT_SIGNALS, signal_number
from dlscale.sim.stream import SimulationSourceConfig
from dlscale.compat import FORMAT_0_1, FORMAT_VERSION, format_version, upgrade_config
from dlscale.train.sources import SOURCES, source_class
from dlscale.train.sources.two_stream import needs_target
from dlscale.train.stages import STAGES, get_stage, stage_tasks
from dlscale.train.target_head import SOURCE_HEAD, TARGET_HEADS
from dlscale.train.tasks import TASKS, task_options
from dlscale.train.weighting import WEIGHTINGS, build_weighting, weighting_class
from dlscale.train.weighting.classic import DWAConfig, FixedConfig
from dlscale.train.weighting.famo import FAMOConfig
import copy


DOMAIN_BATCHNORM = ("joint", "separate")
BUILTIN_SECTIONS = ("fixed", "dwa", "famo")
"""Weightings whose options have a section of their own (`loss.<method>`), not `loss.options.<method>`."""




@dataclass
class TargetDataConfig:
    """Unlabelled images of another domain (instrument) to adapt to, read beside the labelled training data; their
    labels never reach a loss, their val split only scores the run (`target/val/...`)."""
    source: str = ""
    """"": none | shards: the dataset in `data.target.data_dir` (its train split, read as `data.source=shards`
    reads its own) | simulate: fresh simulated lenses (`data.target.simulator`)."""
    data_dir: str = ""
    """the target dataset (`--target-data`); with source=simulate, the evaluation set (default: a set simulated once
    into RUN/target_eval_data)."""
    simulator: SimulationSourceConfig = field(default_factory=lambda: SimulationSourceConfig(preset="model_iii"))
    """Simulated target images (source=simulate): preset, simulator overrides, evaluation set."""
    evaluate: bool = True
    """score the run on the target's `eval.split` too (labels used for scoring only)"""
    adabn: bool = False
    """after training, re-estimate every BatchNorm's statistics on the target's unlabelled train images (AdaBN,
    `dlscale adapt-bn`) into RUN/adabn, a run of its own, scored as `adabn/target/<split>/...`"""
    head: str = SOURCE_HEAD
    """with adabn: then refit RUN/adabn's classification head to the target's features without target labels
    (`dlscale.train.target_head`): source (as trained) | coral | em"""

    def validate(self) -> "TargetDataConfig":
        if self.head not in TARGET_HEADS:
            raise ValueError(f"data.target.head={self.head!r}: expected one of {', '.join(TARGET_HEADS)}")
        if self.head != SOURCE_HEAD and not self.adabn:
            raise ValueError(f"data.target.head={self.head} refits RUN/adabn's head: it needs data.target.adabn=true")
        if self.source and self.source not in SOURCES:
            raise ValueError(f"data.target.source={self.source!r}: expected one of {', '.join(SOURCES)} (or \"\" "
                             "for none)")
        if self.source and SOURCES[self.source].needs_data_dir and not self.data_dir:
            raise ValueError(f"data.target.source={self.source} needs the target dataset: --target-data DIR "
                             "(data.target.data_dir)")
        try:
            self.simulator.validate()
        except ValueError as err:
            raise rehomed(err, SimulationSourceConfig, "data.target.simulator.") from None
        return self


@dataclass
class DataConfig(StreamConfig):
    """Where training batches come from, and how they are made (the stream fields)."""
    source: str = "shards"
    """shards: the dataset in `data_dir`; simulate: fresh simulated lenses every step (`data.simulator`), an epoch
    being `schedule.batches_per_epoch` batches; evaluation then uses `data_dir` if given, else a fixed set simulated
    once into RUN/eval_data."""
    simulator: SimulationSourceConfig = field(default_factory=SimulationSourceConfig)
    """Simulated training images (used with source=simulate): preset, simulator overrides, evaluation set."""
    target: TargetDataConfig = field(default_factory=TargetDataConfig)
    """Domain adaptation (stage adapt): the unlabelled target domain each training batch also carries."""

    def __post_init__(self) -> None:
        StreamConfig.__post_init__(self)
        if self.target.data_dir and not self.target.source:
            self.target.source = "shards"   # --target-data DIR alone means that dataset

    def validate(self) -> "DataConfig":
        StreamConfig.validate(self)
        self.target.validate()
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}: expected one of {', '.join(SOURCES)}")
        self.simulator.validate()
        return self


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="resnet18"))
    """The backbone (`name`: a registered one) with its own options. Naming another backbone (in a file or an
    override) drops the options of the one it replaces; an option of another backbone is refused, naming its key."""
    tasks: list[str] | None = None
    """Tasks of stages that let the run choose (multitask); default recon + classification (+ regression if
    data.targets)."""
    classifier_dropout: float = 0.0
    domain_batchnorm: str = "joint"
    """stage adapt: joint (the labelled and target images pass the encoder in one batch: BatchNorm normalises both
    with one statistic) | separate (each domain's images pass alone, normalised with their own batch statistics,
    as AdaBN's target statistics do at inference; the running statistics stay the labelled domain's)"""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the encoder (`dlscale.models.adapters`): with rank > 0 only they and the heads train"""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Per-task options, typed: task name -> an instance of that task's `Config` (e.g. `mae: {mask_ratio: 0.6}`);
    loading fills in the defaults of every task the run trains, so `--print-config` lists them, and refuses a
    misspelt option naming its dotted key (`model.task_options.<task>.<field>`)."""

    def __post_init__(self) -> None:
        if self.domain_batchnorm not in DOMAIN_BATCHNORM:
            raise ValueError(f"model.domain_batchnorm={self.domain_batchnorm!r}: expected one of {DOMAIN_BATCHNORM}")
        typed = {}
        for name, values in (self.task_options or {}).items():
            if not isinstance(name, str) or name not in TASKS:
                raise ValueError(f"unknown config key 'model.task_options.{name}': no task {name!r}; tasks: "
                                 f"{', '.join(TASKS)}")
            options = task_options(name, values)
            if options is not None:
                typed[name] = options
        self.task_options = typed


@dataclass
class LossConfig:
    method: str = "fixed"
    """fixed | uncertainty (Kendall et al. 2018) | dwa (Liu et al. 2019) | famo (Liu et al. 2023) | upgrad
    (Quinton & Rey 2024, gradient-based) | any registered weighting."""
    fixed: FixedConfig = field(default_factory=FixedConfig)
    dwa: DWAConfig = field(default_factory=DWAConfig)
    famo: FAMOConfig = field(default_factory=FAMOConfig)
    options: dict[str, Any] = field(default_factory=dict)
    """Options of weightings registered outside dlscale, typed: method -> an instance of its `Config` (set as
    `loss.options.<method>.<field>`; loading fills in the chosen method's defaults and refuses unknown keys)."""

    def __post_init__(self) -> None:
        typed = {}
        for method, values in (self.options or {}).items():
            where = f"loss.options.{method}"
            if method in BUILTIN_SECTIONS:
                raise ValueError(f"unknown config key {where!r}: {method!r} has its own section, set "
                                 f"loss.{method}.<field>")
            if not isinstance(method, str) or method not in WEIGHTINGS:
                raise ValueError(f"unknown config key {where!r}: no loss weighting {method!r}; weightings: "
                                 f"{', '.join(WEIGHTINGS)}")
            cls = weighting_class(method)
            if cls.Config is None:
                if values:
                    raise ValueError(f"{where}: loss weighting {method!r} has no options, got {values!r}")
                continue
            typed[method] = values if isinstance(values, cls.Config) else from_dict(cls.Config, values or {},
                                                                                   where + ".")
        self.options = typed

    def method_options(self) -> Any:
        """The options of the chosen method (its config section)."""
        return getattr(self, self.method) if self.method in BUILTIN_SECTIONS else self.options.get(self.method)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """peak learning rate of AdamW"""
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50
    """linear warm-up, then cosine decay to min_lr_ratio * lr"""
    min_lr_ratio: float = 0.01
    encoder_lr_scale: float = 1.0
    """the encoder's learning rate as a multiple of lr (heads keep lr): below 1 fine-tunes a pretrained encoder
    gently while its new heads learn at full speed"""
    layer_decay: float = 1.0
    """layer-wise learning-rate decay (BEiT, Bao et al. 2022): the encoder's layer group at depth d from the output
    (the last stage or ViT block d = 1, the stem d = G; `dlscale.models.layer_groups`) learns at lr x encoder_lr_scale x
    layer_decay^d, the heads at lr; 1 = off"""
    freeze_stages: int = 0
    """partial fine-tuning: the encoder's first k layer groups (stem first) are frozen: no gradient, not in the
    optimiser (their BatchNorm statistics still follow the data); 0 = none"""
    grad_clip: float = 1.0
    """global gradient-norm clip (0 = off)"""
    ema: float = 0.0
    """decay of an exponential moving average of the weights (Polyak; `dlscale.train.weight_average`), updated after
    every optimizer step and checkpointed: the run exports and is scored with the average (mid-run evaluations,
    schedule.eval_every_epochs, use the trained weights). It averages over the last ~1 / (1 - ema) steps (0.999:
    1,000). Needs eval.precise_bn (the averaged weights' BatchNorm statistics); 0 = off"""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """0, 1 or 2 (stage 3 would shard parameters the uneven eval stream needs)"""
    precision: str = "auto"
    """auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16"""
    grad_accum: int = 1
    """gradient accumulation steps"""
    config_file: str | None = None
    """a ds_config JSON used as is (its batch sizes must agree with data.*)"""


@dataclass
class TrainStepConfig:
    """How the training step runs on the device (not what it computes: the losses agree within float tolerance)."""
    compile: bool = False
    """compile the model with DeepSpeed's engine compile (torch.compile, inductor): the first steps take longer while
    kernels are generated (minutes on a CPU, and a C++ compiler is needed there); for GPUs"""
    channels_last: bool = False
    """batches in channels-last (NHWC) layout, which convolutions keep for their outputs: the layout cuDNN's fastest
    kernels take on tensor cores. The weights stay NCHW (DeepSpeed keeps them in flat buffers; a convolution
    converts its weight, a small copy). For CNN backbones on GPUs (ViTs gain nothing)"""


@dataclass
class ScheduleConfig:
    epochs: int = 10
    batches_per_epoch: int | None = None
    """per rank; default: the train split once per epoch"""
    log_every: int = 20
    """steps between log lines / TensorBoard scalars: the host reads the losses (non-finite check, stop signals)
    only then, never inside a step"""
    checkpoint_every: int = 500
    """steps between checkpoints (one is always written at the end)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept on disk (older tags are deleted)"""
    eval_every_epochs: int = 0
    """0 = evaluate only at the end"""
    preempt_signals: list[str] = field(default_factory=lambda: list(DEFAULT_SIGNALS))
    """Signals that stop the run cleanly (SLURM, Kubernetes and spot instances send SIGTERM; SLURM's `--signal`
    another): the ranks train on to the next logging interval, a complete checkpoint is written and they exit with 75
    (`dlscale.preemption.PREEMPTED_EXIT_CODE`); `--resume auto` continues. [] keeps the default handling (death)."""


@dataclass
class EvalConfig:
    split: str = "val"
    probe_samples: int = 4096
    """train samples whose frozen features fit the linear probe"""
    n_bootstrap: int = 200
    """resamples for the macro-AUC 95% CI"""
    calibration_split: str | None = None
    """fit a softmax temperature on this split (never the scored one) and report the scored split's ECE and NLL with
    it (`<split>/ece_calibrated`)"""
    precise_bn: int = 0
    """after the last step, before the heads' refit and the export, re-estimate every BatchNorm's statistics exactly
    on the first N images of the train split with the final weights (`dlscale.train.precise_bn`): the running
    averages of per-batch statistics can be far from them (a constant offset of a long regression run); -1 = every
    train image, 0 = off"""

    def __post_init__(self) -> None:
        if self.precise_bn < -1:
            raise ValueError(f"eval.precise_bn={self.precise_bn}: expected a number of images, -1 (all) or 0 (off)")


@dataclass
class Config:
    format_version: int = FORMAT_VERSION
    """Version of the config format (`dlscale.compat`): files without it are read as dlscale 0.1's."""
    stage: str = "supervised"
    """a name of the stage table (dlscale.train.stages)"""
    data_dir: str = ""
    """dataset directory (manifest.json + shards)"""
    run_dir: str = ""
    """output directory of this run"""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda"""
    init_from: str | None = None
    """encoder.pt, a run directory or an encoder state dict to start from"""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainStepConfig = field(default_factory=TrainStepConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, complete: bool = True) -> "Config":
        """Check every value (once, when the config is loaded or derived); `complete`: the run's inputs too
        (`check_inputs`), which a printed template or a sweep's base may leave empty."""
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
        if not 0 < self.optim.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay={self.optim.layer_decay}: expected a factor in (0, 1] (1 = off)")
        self.model.lora.validate()
        if not 0 <= self.optim.ema < 1:
            raise ValueError(f"optim.ema={self.optim.ema}: expected a decay in [0, 1) (0 = off)")
        if self.optim.ema and not self.eval.precise_bn:
            raise ValueError(f"optim.ema={self.optim.ema} needs eval.precise_bn (-1 or a number of images): the "
                             "BatchNorm statistics gathered during training belong to the trained weights, not to "
                             "their average")
        if self.optim.freeze_stages < 0:
            raise ValueError(f"optim.freeze_stages={self.optim.freeze_stages}: expected a count >= 0 (0 = none)")
        self.data.validate()
        source = source_class(self.data.source)
        source(self).check_config()
        if self.eval.calibration_split is not None and self.eval.calibration_split == self.eval.split:
            raise ValueError(f"eval.calibration_split={self.eval.calibration_split!r} is the scored split "
                             "(eval.split): a temperature fitted on the split it is scored on flatters it; "
                             "name another split (e.g. test) or null")
        for name in self.schedule.preempt_signals:
            try:
                signal_number(name)
            except ValueError as err:
                raise ValueError(f"schedule.preempt_signals: {err}") from None
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version={self.format_version}: expected {FORMAT_VERSION} (older files are "
                             "translated on load, see dlscale.compat)")
        tasks = run_tasks(self)
        extra = sorted(set(self.model.task_options) - set(tasks))
        if extra:
            raise ValueError(f"model.task_options.{extra[0]}: this run trains tasks {list(tasks)}")
        adapting = needs_target(tasks)
        if adapting and not self.data.target.source:
            raise ValueError(f"tasks {adapting} read the unlabelled images of data.target and none is given: "
                             "--target-data DIR (a dataset with a train split) or --data.target.source=simulate "
                             "--data.target.simulator.preset=model_iii")
        if self.data.target.adabn and not self.data.target.source:
            raise ValueError("data.target.adabn=true needs a target domain: --target-data DIR or "
                             "data.target.source=simulate")
        check_weighting(self)
        if complete:
            self.check_inputs()
        return self

    def check_inputs(self) -> None:
        """The run has its directory and what its source needs (its dataset, unless the source makes its own)."""
        if not self.run_dir:
            raise ValueError("run_dir (--run-dir) is required")
        source_class(self.data.source)(self).check_inputs()


def run_tasks(cfg: Config) -> tuple[str, ...]:
    """The tasks a run of this config trains."""
    return stage_tasks(cfg.stage, cfg.model.tasks, len(cfg.data.targets))


def check_weighting(cfg: Config) -> None:
    """Build the configured weighting once for the run's tasks: bad options raise here, before anything starts."""
    build_weighting(cfg.loss.method, run_tasks(cfg), cfg.loss.method_options())


def migrate(tree: dict) -> dict:
    """A config tree (a sweep's `train` section, with its overrides) in today's form: 0.1's keys are translated
    wherever they appear, as dotted overrides are (`dlscale.compat.upgrade_config`); a newer version is refused."""
    format_version(tree, "config")
    return upgrade_config(tree, FORMAT_0_1)


def fill_options(cfg: Config) -> Config:
    """The defaults of the options of every task the run trains and of its weighting, so the config lists them
    (`--print-config`, config.yaml); options of a task the run does not train are refused naming the key. A
    stage / task choice that is itself wrong is left to `validate`."""
    try:
        tasks = run_tasks(cfg)
    except ValueError:
        return cfg
    extra = sorted(set(cfg.model.task_options) - set(tasks))
    if extra:
        raise ValueError(f"config key 'model.task_options.{extra[0]}': stage {cfg.stage!r} trains tasks "
                         f"{list(tasks)}, not {extra[0]!r}")
    for name in tasks:
        if name not in cfg.model.task_options and TASKS[name].Config is not None:
            cfg.model.task_options[name] = TASKS[name].Config()
    method = cfg.loss.method
    if method in WEIGHTINGS and method not in BUILTIN_SECTIONS and method not in cfg.loss.options:
        if WEIGHTINGS[method].Config is not None:
            cfg.loss.options[method] = WEIGHTINGS[method].Config()
    return cfg


def print_config(cfg: Config) -> str:
    """The resolved config as YAML with each key's documentation as a comment above it (`--print-config`): the
    chosen stage's task options, the weighting's options and, for each simulated side (data.source=simulate,
    data.target.source=simulate), every simulator key with the preset's value (as `overrides`; per component of a
    mixture). Loads back (`--config`) to the same config."""
    shown = copy.deepcopy(cfg)
    simulated = [s.simulator for s, source in ((shown.data, shown.data.source),
                                               (shown.data.target, shown.data.target.source)) if source == "simulate"]
    for simulator in simulated:
        for part in (simulator, *simulator.mixture.values()):
            sim = part.simulator_config()
            part.overrides = {f.name: getattr(sim, f.name) for f in fields(sim) if f.name != "preset"}
    return commented_yaml(shown)


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None, complete: bool = False,
                **top: Any) -> Config:
    """The training config, checked: defaults < the stage's defaults < YAML file < dotted overrides
    (`section.key=value`) < keyword arguments (None: not given). Unknown keys, wrong types and bad values raise
    naming the dotted key; `complete`: the run's inputs (data_dir, run_dir) must be there too."""
    given = upgrade_config(read_yaml(yaml_path)) if yaml_path else {}
    given = merge_overrides(given, overrides, Config, lambda tree: upgrade_config(tree, FORMAT_0_1, overrides=True))
    given.update({k: v for k, v in top.items() if v is not None})
    stage = given.get("stage", Config.stage)
    stage_defaults = STAGES[stage].defaults if isinstance(stage, str) and stage in STAGES else {}
    tree = merge(merge(to_dict(Config()), stage_defaults, Config), given, Config)
    return fill_options(from_dict(Config, tree)).validate(complete)
