"""The sweep file and its search space, checked before Ray starts.

The sweep file (default: `multitask.yaml` shipped in this package) has three sections: `sweep` (`SweepSettings`:
the ranking metric, the two Pareto axes, scheduler, search, trials, retries), `space` (dotted training-config keys
-> `{choice: [...]}`, `{grid: [...]}`, `{uniform: [low, high]}`, `{loguniform: [low, high]}` or
`{randint: [low, high]}`, high included) and `train` (the base training config, the tree `dlscale train --config`
reads). A space key `loss.fixed.weights.<task>` (or `loss.weights.<task>`) is that task's loss weight relative to
classification (which stays 1.0); it applies to the trials whose `loss.method` is `fixed` (the other weightings
find their own weights).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlscale.configtree import (commented_yaml, from_dict, merge, overrides_tree, parse_override, read_yaml,
                                set_dotted, to_dict)
from dlscale.train.config import Config, migrate, run_tasks

SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
WEIGHT_KEYS = ("loss.fixed.weights.", "loss.weights.")   # `<prefix><task>`: weight relative to the reference task
REFERENCE_TASK = "classification"
DEFAULT_SWEEP_FILE = Path(__file__).resolve().with_name("multitask.yaml")
SWEEP_RECORD = "sweep.yaml"


def weight_task(key: str) -> str | None:
    """The task of a loss-weight space key, else None."""
    prefix = next((p for p in WEIGHT_KEYS if key.startswith(p)), None)
    return key.removeprefix(prefix) if prefix else None


@dataclass
class SweepSettings:
    """The `sweep:` section: what ranks the trials and how they are chosen, stopped and retried."""
    metric: str = "val/auc_macro"     # reported metric that ranks trials (ASHA's and the results table's)
    mode: str = "max"                 # max | min
    scheduler: str = "asha"           # asha: stop weak trials at rungs of grace_period * reduction_factor^k epochs
    #                                   fifo: every trial trains all its epochs
    search: str = "random"            # random | optuna (needs `pip install optuna`)
    trials: int = 16                  # configurations to sample (each combination of grid values gets this many)
    grace_period: int = 1             # epochs every trial trains before ASHA may stop it
    reduction_factor: float = 2.0     # ASHA keeps the best 1/reduction_factor of the trials at each rung
    max_failures: int = 2             # a crashing trial is retried this often (from its last checkpoint)
    seed: int = 0                     # seed of the search itself (the trials' training seed is train.seed)
    pareto: dict[str, str] = field(default_factory=lambda: {"val/recon_mse": "min", "val/auc_macro": "max"})
    """The two metrics of the Pareto figure, x axis first, each with min | max (which way is better)."""

    def validate(self) -> "SweepSettings":
        choices = {"mode": ("max", "min"), "scheduler": ("asha", "fifo"), "search": ("random", "optuna")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"sweep.{key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        if len(self.pareto) != 2 or set(self.pareto.values()) - {"min", "max"}:
            raise ValueError(f"sweep.pareto={self.pareto!r}: expected two metrics, each with min or max, e.g. "
                             "{val/recon_mse: min, val/auc_macro: max}")
        if self.trials < 1 or self.grace_period < 1 or self.max_failures < 0 or not self.reduction_factor > 1:
            raise ValueError("sweep.trials and sweep.grace_period must be >= 1, sweep.max_failures >= 0 and "
                             "sweep.reduction_factor > 1")
        return self


@dataclass
class SweepSpec:
    """A whole sweep: settings, the checked search space ({key: (kind, values)}) and the base training config."""
    settings: SweepSettings
    space: dict[str, tuple[str, list]]
    base: Config

    @property
    def metrics(self) -> list[str]:
        """The metrics the results show: the ranking metric, the Pareto axes, accuracy."""
        return list(dict.fromkeys([self.settings.metric, *self.settings.pareto, "val/accuracy"]))

    def to_file(self) -> "SweepFile":
        return SweepFile(self.settings, {k: {kind: values} for k, (kind, values) in self.space.items()}, self.base)

    def to_tree(self) -> dict:
        return to_dict(self.to_file())


@dataclass
class SweepFile:
    """A sweep file as `dlscale tune --config` reads it and `--print-config` prints it (comments included)."""
    sweep: SweepSettings = field(default_factory=SweepSettings)
    space: dict[str, dict[str, list]] = field(default_factory=dict)
    """training-config keys -> one range each: {choice: [...]}, {grid: [...]}, {uniform: [low, high]},
    {loguniform: [low, high]}, {randint: [low, high]}; loss.fixed.weights.<task>: that task's weight relative to
    classification"""
    train: Config = field(default_factory=Config)
    """The base training config of every trial (the tree `dlscale train --config` reads)."""


def print_sweep(spec: SweepSpec) -> str:
    """The checked sweep as YAML, each key's meaning as a comment above it; `--config` reads it back."""
    return commented_yaml(spec.to_file())


def load_sweep(path: str | Path, overrides: list[str] | None = None, data_dir: str | None = None,
               trials: int | None = None, complete: bool = True) -> SweepSpec:
    """Read a sweep file; `overrides` are `--sweep.key=value` (settings) or `--section.key=value` (base training
    config). Everything is checked here, before Ray starts: an unknown key or a bad range raises naming it;
    `complete`: the dataset must be given too (a printed sweep may leave it out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found")
    tree = read_yaml(path)
    if set(tree) - {"sweep", "space", "train"}:
        raise ValueError(f"{path}: expected a mapping with the sections sweep, space and train; got {sorted(tree)}")
    settings = dict(tree.get("sweep") or {})
    base = to_dict(from_dict(Config, migrate(dict(tree.get("train") or {})), "train."))
    train = []
    for item in overrides or []:
        key, value = parse_override(item)
        if key.startswith("sweep."):
            settings[key.removeprefix("sweep.")] = value
        else:
            train.append(item)
    base = migrate(merge(base, overrides_tree(train), Config))   # another encoder name drops the base's options
    if trials is not None:
        settings["trials"] = trials
    if data_dir is not None:
        base["data_dir"] = str(Path(data_dir).resolve())
    settings = from_dict(SweepSettings, settings, "sweep.").validate()
    base_cfg = from_dict(Config, base)
    if len(run_tasks(base_cfg)) < 2:
        raise ValueError(f"{path}: train.stage {base_cfg.stage!r} trains {list(run_tasks(base_cfg))}; dlscale tune "
                         "sweeps the loss weighting of several tasks (e.g. the multitask stage)")
    if complete and not base_cfg.data_dir and base_cfg.data.source == "shards":
        raise ValueError("no dataset: pass --data DIR (or train from the simulator: --data.source=simulate)")
    base_cfg.validate(complete=False)
    space = check_space(tree.get("space"), base_cfg)
    if settings.scheduler == "asha":
        if base_cfg.schedule.eval_every_epochs < 1:
            raise ValueError("sweep.scheduler=asha compares trials at evaluations: set train.schedule."
                             "eval_every_epochs >= 1 (or use sweep.scheduler=fifo)")
        fixed_budget = sorted({"schedule.epochs", "schedule.eval_every_epochs"} & set(space))
        if fixed_budget:
            raise ValueError(f"search space key {fixed_budget[0]!r}: ASHA needs the same epochs and evaluations in "
                             "every trial; fix it in train.schedule (or use sweep.scheduler=fifo)")
        if settings.grace_period > base_cfg.schedule.epochs:
            raise ValueError(f"sweep.grace_period={settings.grace_period} exceeds train.schedule.epochs="
                             f"{base_cfg.schedule.epochs}")
    if settings.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ValueError("sweep.search=optuna needs optuna: pip install optuna (or use sweep.search=random)")
        if any(kind == "grid" for kind, _ in space.values()):
            raise ValueError("grid values cannot be searched by optuna; use choice (or sweep.search=random)")
    return SweepSpec(settings, space, base_cfg)


def check_space(space: Any, base: Config) -> dict[str, tuple[str, list]]:
    """The `space:` section checked against the base config: every key must be a training-config key (or
    `loss.weights.<task>`), every range non-empty and every candidate value must give a valid trial config."""
    if not isinstance(space, dict) or not space:
        raise ValueError("space: expected a mapping of training-config keys to ranges, e.g. "
                         "`optim.lr: {loguniform: [1.0e-4, 3.0e-3]}`")
    checked = {}
    for key, spec in space.items():
        where = f"search space key {key!r}"
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS):
            raise ValueError(f"{where}: expected one of {{choice: [...]}}, {{grid: [...]}}, {{uniform: [low, high]}}, "
                             f"{{loguniform: [low, high]}}, {{randint: [low, high]}}; got {spec!r}")
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
            probes = values
        else:
            values = _range(where, kind, values)
            probes = values if kind == "randint" else [float(v) for v in values]
        if weight_task(key) is not None:
            _check_weight_key(where, weight_task(key), probes, base)
        for value in probes:
            try:
                trial_config(base, {key: value})
            except (ValueError, TypeError) as err:
                raise ValueError(f"{where} = {value!r}: {err}") from None
        checked[key] = (kind, values)
    return checked


def _range(where: str, kind: str, values: Any) -> list:
    if not (isinstance(values, list) and len(values) == 2):
        raise ValueError(f"{where}: {kind} needs [low, high], got {values!r}")
    try:   # YAML 1.1 reads 1e-4 (no dot) as a string
        low, high = (v if isinstance(v, (int, float)) and not isinstance(v, bool) else float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {kind} needs two numbers [low, high], got {values!r}") from None
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"{where}: randint needs integer bounds, got {values!r}")
    if not low < high:
        raise ValueError(f"{where}: {kind} range [{low}, {high}] is empty or inverted: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs 0 < low < high, got [{low}, {high}]")
    return [int(low), int(high)] if kind == "randint" else [low, high]


def _check_weight_key(where: str, task: str, probes: list, base: Config) -> None:
    tasks = run_tasks(base)
    if task == REFERENCE_TASK or task not in tasks:
        raise ValueError(f"{where}: loss.fixed.weights.<task> is a task's weight relative to {REFERENCE_TASK} (1.0); "
                         f"<task> must be one of this model's other tasks {[t for t in tasks if t != REFERENCE_TASK]}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in probes):
        raise ValueError(f"{where}: loss weights must be positive numbers, got {probes!r}")


def trial_config(base: Config, params: Mapping[str, Any], run_dir: str | Path | None = None) -> Config:
    """The training config of one trial: `base` with the sampled `params` (dotted keys) set. Loss weights apply to
    `fixed` weighting only: sampled `loss.fixed.weights.<task>` ratios become {<task>: ratio, classification: 1.0,
    other tasks: their base weight or 1.0}; other weightings get `loss.fixed.weights=None`. Checked (with
    `run_dir`: complete)."""
    sampled, ratios = {}, {}
    for key, value in params.items():
        if weight_task(key) is not None:
            ratios[weight_task(key)] = float(value)
        else:
            set_dotted(sampled, key, value)
    tree = merge(to_dict(base), sampled, Config)     # a sampled encoder name drops the base encoder's options
    if run_dir is not None:
        tree["run_dir"] = str(run_dir)
    cfg = from_dict(Config, tree)
    if cfg.loss.method != "fixed":
        cfg.loss.fixed.weights = None
    elif ratios:
        tasks = run_tasks(cfg)
        weights = {**{t: 1.0 for t in tasks}, **(cfg.loss.fixed.weights or {}), **ratios, REFERENCE_TASK: 1.0}
        cfg.loss.fixed.weights = {t: weights[t] for t in tasks}
    return cfg.validate(complete=run_dir is not None)


def param_space(space: Mapping[str, tuple[str, list]]) -> dict:
    """Tune's search space (flat, dotted keys) from the checked space."""
    from ray import tune
    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: make[kind](values) for key, (kind, values) in space.items()}
