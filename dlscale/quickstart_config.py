"""The typed config of `dlscale quickstart`: the simulated data, every step's whole training config, the
label-efficiency study and the cheap downstream tasks (two `dlscale transfer` configs).

Loaded once, checked: a scale of the packaged recipes (`dlscale/recipes/quickstart.yaml`: `common` settings under
each step's own, over a packaged training recipe as `base`) or a file that `--print-config` printed (`--config`),
then `--section.key=value` overrides (e.g. `--steps.pretrain.train.schedule.epochs=4`), then the command's flags.
Every path follows from `out` (the data in OUT/data, each step's run in OUT/<step>, the studies in
OUT/label_efficiency and OUT/downstream) and is set here, so a printed config loads back identical.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlscale.configtree import commented_yaml, from_dict, merge, overrides_tree, read_yaml, set_dotted, to_dict
from dlscale.data.classes import CLASSES
from dlscale.distributed import local_ranks
from dlscale.recipes import QUICKSTART, config_path
from dlscale.sim.config import PRESETS
from dlscale.sim.write import split_counts
from dlscale.train.config import Config, load_config
from dlscale.transfer.config import TransferConfig


@dataclass
class StepConfig:
    """One run of the pipeline (its stage: `train.stage`)."""
    init_from: str | None = None
    """the earlier step whose encoder starts this one"""
    from_stream: bool = False
    """train on fresh simulated images (data.source=simulate), each epoch as many as the labelled train split holds;
    evaluate on the labelled data"""
    train: Config = field(default_factory=Config)
    """The step's whole training config (run_dir, data_dir, init_from and seed follow from the quickstart's)."""


@dataclass
class QuickstartConfig:
    """The demo, end to end: simulate labelled data, train each step, study the pretrained encoder."""
    out: str = "runs/quickstart"
    """output directory: OUT/data, OUT/<step>, OUT/label_efficiency, OUT/downstream, OUT/report.md"""
    scale: str = "small"
    """the packaged recipe this config was resolved from (small: CPU-sized; tiny: smoke test; full: GPUs)"""
    seed: int = 0
    preset: str = "model_ii"
    """simulator preset of the labelled data"""
    n_per_class: int = 2000
    """simulated labelled images per class"""
    sim_batch: int = 32
    """simulation batch"""
    val_fraction: float = 0.2
    """of the simulated images: the validation split every metric is taken on"""
    steps: dict[str, StepConfig] = field(default_factory=dict)
    """The runs, in order (pretrain first: the studies take its encoder)."""
    transfer: TransferConfig = field(default_factory=TransferConfig)
    """The label-efficiency study of the pretrained encoder (`dlscale transfer`)."""
    downstream: TransferConfig | None = None
    """The cheap downstream tasks on the pretrained encoder's frozen features (null: none)."""

    @property
    def data_dir(self) -> Path:
        return Path(self.out) / "data"

    @property
    def splits(self) -> dict[str, float]:
        return {"train": 1 - self.val_fraction, "val": self.val_fraction}

    @property
    def n_train(self) -> int:
        """Labelled train images the simulation writes (every class)."""
        return split_counts(self.n_per_class, self.splits)["train"] * len(CLASSES)

    def validate(self) -> "QuickstartConfig":
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: expected one of {', '.join(PRESETS)}")
        if self.n_per_class < 1 or self.sim_batch < 1 or not 0 < self.val_fraction < 1:
            raise ValueError("n_per_class and sim_batch must be >= 1, val_fraction within (0, 1)")
        if "pretrain" not in self.steps:
            raise ValueError(f"steps: the studies take the encoder of a step named pretrain; steps: "
                             f"{', '.join(self.steps)}")
        for name, step in self.steps.items():
            if step.init_from is not None and step.init_from not in self.steps:
                raise ValueError(f"steps.{name}.init_from={step.init_from!r}: not a step of this config")
            try:
                step.train.validate()
            except ValueError as err:
                raise ValueError(f"steps.{name}.train: {err}") from None
        for key, study in (("transfer", self.transfer), ("downstream", self.downstream)):
            if study is not None:
                try:
                    study.validate()
                except ValueError as err:
                    raise ValueError(f"{key}: {err}") from None
        return self


def scale_names() -> list[str]:
    return list(_recipes()["scales"])


def recipe_parts() -> dict:
    """The named settings the scales share (`parts` of the recipe file: the pretraining tasks and loss)."""
    return _recipes()["parts"]


def _recipes() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def _scale(name: str) -> dict:
    scales = _recipes()["scales"]
    if name not in scales:
        raise ValueError(f"--scale {name}: expected one of {', '.join(scales)}")
    return scales[name]


def resolved_step(scale: str, step: dict) -> dict:
    """A recipe step (stage, init_from, from_stream, train settings) of scale `scale` as a StepConfig tree: its
    training config loaded from defaults < stage defaults < the scale's base recipe < its `common` settings < the
    step's own (merged as training configs merge: a step naming another backbone drops the options of the one
    below it); a stream step simulates the scale's preset."""
    recipe = _scale(scale)
    base = read_yaml(config_path(recipe["base"])) if recipe.get("base") else {}
    tree = merge(merge(base, recipe.get("common", {}), Config), step.get("train", {}), Config)
    if step.get("from_stream"):
        tree = merge({"data": {"source": "simulate", "simulator": {"preset": recipe["preset"]}}}, tree, Config)
    train = load_config(None, None, **{**tree, "stage": step["stage"]})
    return {"init_from": step.get("init_from"), "from_stream": bool(step.get("from_stream")), "train": to_dict(train)}


def resolved_scale(name: str) -> dict:
    """The packaged scale `name` as a QuickstartConfig tree, every step resolved (`resolved_step`)."""
    recipe = {k: v for k, v in _scale(name).items() if k not in ("base", "common", "steps")}
    steps = {step_name: resolved_step(name, step) for step_name, step in _scale(name)["steps"].items()}
    return {**recipe, "scale": name, "steps": steps}


def with_step(cfg: QuickstartConfig, name: str, step: dict) -> QuickstartConfig:
    """`cfg` with one more step (a recipe step over `cfg`'s scale: `resolved_step`), placed and checked."""
    steps = {**cfg.steps, name: from_dict(StepConfig, resolved_step(cfg.scale, step))}
    return placed(dataclasses.replace(cfg, steps=steps)).validate()


def load_quickstart_config(scale: str | None = None, yaml_path: str | Path | None = None,
                           overrides: list[str] | None = None, given: dict | None = None) -> QuickstartConfig:
    """A packaged scale (default small) or a printed config (`yaml_path`), then dotted overrides, then `given` (the
    command's flags: out, seed, n_per_class, and `epochs` for every step and the label-efficiency study); the paths
    set from `out`; checked."""
    if scale and yaml_path:
        raise ValueError("--scale and --config: give one (a printed config already holds its scale)")
    tree = read_yaml(yaml_path) if yaml_path else resolved_scale(scale or QuickstartConfig.scale)
    tree = merge(tree, overrides_tree(overrides))
    given = dict(given or {})
    epochs = given.pop("epochs", None)
    if epochs is not None:
        for name in tree["steps"]:
            set_dotted(tree, f"steps.{name}.train.schedule.epochs", epochs)
        set_dotted(tree, "transfer.budget.epochs", epochs)
    tree = merge(tree, given)
    return placed(from_dict(QuickstartConfig, merge(to_dict(QuickstartConfig()), tree))).validate()


def placed(cfg: QuickstartConfig) -> QuickstartConfig:
    """Every path and seed that follows from `out` and `seed` (the steps' runs, the studies' inputs and outputs),
    and a stream step's epoch: as many fresh images as the labelled train split holds, on every local rank."""
    out, data = Path(cfg.out), str(cfg.data_dir)
    steps = {}
    for name, step in cfg.steps.items():
        train = dataclasses.replace(step.train, data_dir=data, run_dir=str(out / name), seed=cfg.seed,
                                    init_from=str(out / step.init_from) if step.init_from else None)
        if step.from_stream:
            batches = max(1, math.ceil(cfg.n_train / (train.data.batch_size * local_ranks())))
            train = dataclasses.replace(train, schedule=dataclasses.replace(train.schedule, batches_per_epoch=batches))
        steps[name] = dataclasses.replace(step, train=train)

    def study(where: str, study: TransferConfig | None, **fixed: Any) -> TransferConfig | None:
        if study is None:
            return None
        return dataclasses.replace(study, encoders=[str(out / "pretrain")], data_dir=data, out=str(out / where),
                                   seed=cfg.seed, ranks=local_ranks(), **fixed)
    return dataclasses.replace(
        cfg, steps=steps,
        transfer=study("label_efficiency", cfg.transfer, methods=["probe", "finetune", "lpft", "scratch", "random"],
                       tasks=["classification"]),
        downstream=study("downstream", cfg.downstream, repeats=1, methods=["probe"],
                         tasks=["regression", "anomaly"]))


def print_quickstart_config(cfg: QuickstartConfig) -> str:
    return commented_yaml(cfg)
