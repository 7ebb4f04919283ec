"""The typed config of `dlscale transfer`: defaults < YAML file (`--config`) < `--section.key=value` overrides <
the command's flags, validated once when loaded; `--print-config` prints it with each key's meaning, and the printed
YAML loads back to the same config.

The study's own keys sit at the top; `data`, `optim` and `deepspeed` are the training config's sections of the same
names, applied to every fine-tune and scratch run (and `data` to the probes' stream); `task_options` holds one typed
section per registered downstream task that has options (`DownstreamTask.Config`), so a task defined outside
dlscale brings its own keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlscale.configtree import commented_yaml, from_dict, merge, overrides_tree, read_yaml, to_dict
from dlscale.data.stream_config import NORMALIZATIONS, StreamConfig
from dlscale.distributed import local_ranks
from dlscale.models.model import TARGET_DOMAIN
from dlscale.train.config import DeepSpeedConfig, OptimConfig
from dlscale.train.tasks import TASKS
from dlscale.transfer.methods import DEFAULT_METHODS, METHODS, TRAINED
from dlscale.transfer.subsets import ALL, parse_sizes
from dlscale.transfer.tasks import ALL_TASKS, DOWNSTREAM


@dataclass
class BudgetConfig:
    """The training budget every fine-tune and scratch run shares (the same for a pretrained encoder and scratch)."""
    epochs: int = 10
    """epochs of each run; an epoch is max(min_batches_per_epoch, N_train / (batch x ranks), min_steps / epochs)
    batches"""
    min_batches_per_epoch: int = 5
    """floor of an epoch on a small subset"""
    min_steps: int = 0
    """floor of a run's steps: an epoch gets at least ceil(min_steps / epochs) batches, so a small subset trains as
    many steps as a larger one (1,000 images at batch 32 on 2 ranks are 15 batches an epoch); 0 = no floor"""
    finetune_encoder_lr_scale: float = 1.0
    """runs from a pretrained encoder (every trained method but scratch): its learning rate as a multiple of its
    new head's"""
    layer_decay: float = 0.75
    """method layer_decay: the encoder's layer group d from the output learns at layer_decay^d of the head's rate
    (`optim.layer_decay` of its runs)"""
    freeze_stages: int = 2
    """method partial: the encoder's first k layer groups (stem first) stay frozen (`optim.freeze_stages`)"""
    lora_rank: int = 8
    """method lora: rank of the adapters (`model.lora.rank`; ViT encoders only)"""
    unlabelled_tasks: dict[str, float] = field(default_factory=lambda: {"recon_unlabelled": 100.0})
    """methods multitask, multitask_scratch: the tasks that learn from every train image, labelled or not (the
    study's train split read as the unlabelled stream `data.target`), and their loss weights against the labelled
    tasks' (1 each). recon_unlabelled: reconstruction (the MSE of min-max normalised lensing images is ~5e-4 against
    a cross-entropy ~1, hence 100; 100 was level with 1000 from a pretrained encoder and above it from scratch);
    contrastive_unlabelled: SimCLR on two views (S4L's auxiliary); selftrain: AdaMatch's pseudo-labels
    (classification only); any other task that reads `data.target`"""


@dataclass
class TransferConfig:
    """A transfer study: pretrained encoders against the same architecture from scratch, on nested label subsets."""
    encoders: list[str] = field(default_factory=list)
    """encoder.pt files, encoder.safetensors files or run directories (`--encoder`, repeatable)"""
    data_dir: str = ""
    """dataset directory (manifest.json + shards): label subsets from its train split (`--data`)"""
    out: str = ""
    """output directory; finished runs in it are reused (`--out`)"""
    eval_data: str | None = None
    """score the frozen-encoder methods on this dataset's eval split instead (cross-dataset transfer)"""
    labels_per_class: list[Any] = field(default_factory=lambda: [10, 100, 1000, ALL])
    """N labels per class, ascending, and/or all (the whole train split)"""
    repeats: int = 3
    """seeded label subsets per N"""
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """some of probe, finetune, scratch, random, lpft, layer_decay, partial, lora, multitask, multitask_scratch
    (`dlscale.transfer.methods`)"""
    split: str = "val"
    """the eval split every metric is taken on: val | test"""
    tasks: list[str] = field(default_factory=lambda: [ALL_TASKS])
    """downstream tasks; all: every registered task the data allow (the others are skipped with a log line)"""
    seed: int = 0
    n_bootstrap: int = 1000
    """bootstrap draws of each CI"""
    ranks: int = 0
    """training ranks of the fine-tune and scratch runs (0: every local GPU, or 2 on CPU; 1: in this process)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    normalize: str | None = None
    """per-image normalisation: null takes each encoder's own (what it was trained with); a name forces one"""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    data: StreamConfig = field(default_factory=StreamConfig)
    """The stream of the probes and of every run (batch size, workers, resize, ...); `normalize` is the top key's."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimiser of the fine-tune and scratch runs."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """The DeepSpeed settings of the fine-tune and scratch runs."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Per downstream task, its typed options (`task_options.<task>.<key>`); every task that has options is listed."""

    def __post_init__(self) -> None:
        typed = {}
        for name, values in (self.task_options or {}).items():
            cls = DOWNSTREAM.get(name) if isinstance(name, str) else None
            if cls is None:
                raise ValueError(f"unknown config key 'task_options.{name}': downstream tasks: {', '.join(DOWNSTREAM)}")
            if cls.Config is None:
                raise ValueError(f"task_options.{name}: downstream task {name!r} has no options, got {values!r}")
            typed[name] = values if isinstance(values, cls.Config) else from_dict(cls.Config, values or {},
                                                                                  f"task_options.{name}.")
        for name, cls in DOWNSTREAM.items():
            if cls.Config is not None and name not in typed:
                typed[name] = cls.Config()
        self.task_options = typed

    @property
    def eval_dir(self) -> str:
        return self.eval_data or self.data_dir

    def options(self, task: str) -> Any:
        """The typed options of downstream task `task`."""
        return self.task_options[task]

    def validate(self, complete: bool = True) -> "TransferConfig":
        """Check every value; `complete`: the inputs too (encoders, data_dir, out), which a printed config template
        may leave empty."""
        if complete and not self.encoders:
            raise ValueError("encoders (--encoder): give at least one encoder.pt or run directory")
        if complete and (not self.data_dir or not self.out):
            raise ValueError("data_dir (--data) and out (--out) are required")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods {','.join(self.methods)}: expected some of {','.join(METHODS)}")
        if self.repeats < 1 or self.budget.epochs < 1 or self.ranks < 1 or self.n_bootstrap < 0:
            raise ValueError("repeats, budget.epochs and ranks must be >= 1, n_bootstrap >= 0")
        if self.budget.min_batches_per_epoch < 1 or self.budget.min_steps < 0:
            raise ValueError(f"budget.min_batches_per_epoch={self.budget.min_batches_per_epoch}, budget.min_steps="
                             f"{self.budget.min_steps}: expected >= 1 and >= 0")
        self.labels_per_class = parse_sizes(",".join(str(n) for n in self.labels_per_class))
        if self.split not in ("val", "test"):
            raise ValueError(f"split={self.split!r}: expected val or test")
        if not self.tasks:
            raise ValueError("tasks: give at least one downstream task (or 'all')")
        for name in self.tasks:
            if name != ALL_TASKS:
                DOWNSTREAM.get_class(name)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r}: expected null (each encoder's) or one of "
                             f"{NORMALIZATIONS}")
        if self.data.normalize != StreamConfig.normalize:
            raise ValueError(f"data.normalize={self.data.normalize!r}: the study takes each encoder's normalisation; "
                             "set normalize=NAME to force one for every encoder")
        trained = sorted(set(TRAINED) & set(self.methods))
        if self.eval_data and trained:
            raise ValueError(f"eval_data (--eval-data) scores the frozen-encoder methods (probe, random) on other "
                             f"data; training runs ({', '.join(trained)}) evaluate on their own data: use --methods "
                             "probe,random")
        if self.budget.finetune_encoder_lr_scale <= 0:
            raise ValueError(f"budget.finetune_encoder_lr_scale={self.budget.finetune_encoder_lr_scale}: expected a "
                             "multiple > 0")
        if not 0 < self.budget.layer_decay <= 1 or self.budget.freeze_stages < 0 or self.budget.lora_rank < 1:
            raise ValueError(f"budget.layer_decay={self.budget.layer_decay}, budget.freeze_stages="
                             f"{self.budget.freeze_stages}, budget.lora_rank={self.budget.lora_rank}: expected a "
                             "factor in (0, 1], a count >= 0 and a rank >= 1")
        self.budget.unlabelled_tasks = check_unlabelled_tasks(self.budget.unlabelled_tasks)
        for options in self.task_options.values():
            check = getattr(options, "validate", None)
            if check is not None:
                check()
        return self


def load_transfer_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None,
                         given: dict | None = None, complete: bool = True) -> TransferConfig:
    """Defaults < YAML file < dotted overrides (`section.key=value`) < `given` (a nested mapping of keys: the
    command's flags, or a recipe), checked (`complete`: the inputs too); `ranks` 0 resolves to the local ranks
    here, so the config records how many ran."""
    tree = read_yaml(yaml_path) if yaml_path else {}
    tree = merge(merge(tree, overrides_tree(overrides)), given or {})
    cfg = from_dict(TransferConfig, merge(to_dict(TransferConfig()), tree))
    if cfg.ranks == 0:
        cfg.ranks = local_ranks()
    return cfg.validate(complete)


def print_transfer_config(cfg: TransferConfig) -> str:
    """The config as YAML, each key's meaning as a comment above it; `--config` reads it back to the same config."""
    return commented_yaml(cfg)


def check_unlabelled_tasks(tasks: dict) -> dict[str, float]:
    """`budget.unlabelled_tasks` as {task: weight}, or an error naming the entry: at least one registered task that
    reads the unlabelled stream, each with a weight > 0."""
    key = "budget.unlabelled_tasks"
    if not tasks:
        raise ValueError(f"{key} is empty: expected at least one task and its loss weight, e.g. "
                         "{recon_unlabelled: 100.0}")
    readers = [name for name, task in TASKS.items() if TARGET_DOMAIN in task.batch_keys]
    checked = {}
    for name, weight in tasks.items():
        if name not in readers:
            raise ValueError(f"{key}.{name}: not a task that learns from the unlabelled stream; expected one of "
                             f"{', '.join(readers)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{key}.{name}={weight!r}: expected a loss weight > 0")
        checked[name] = float(weight)
    return checked
