"""Search the multi-task loss weighting (or any training setting) with Ray Tune: which weighting wins, and what it
costs in reconstruction quality. Every trial is one `dlscale.train.run` of stage multitask.

    dlscale tune --data shards/ --out sweeps/weighting                                  # laptop: local Ray, all CPUs
    dlscale tune --data shards/ --out sweeps/w --address auto --gpus-per-trial 1 --trials 48      # a Ray cluster
    dlscale tune --data shards/ --out sweeps/w4 --address auto --workers-per-trial 4 --gpus-per-trial 4  # 4-rank trials
    dlscale tune --out sweeps/weighting --resume                                        # after Ctrl-C or a crash
    python tune/sweep.py ...                                                            # the same

The sweep file (default `tune/multitask.yaml`) has three sections: `sweep` (`SweepSettings`), `space` (dotted
training-config keys -> `{choice: [...]}`, `{grid: [...]}`, `{uniform: [low, high]}`, `{loguniform: [low, high]}` or
`{randint: [low, high]}`, high included) and `train` (the base training config, the tree `dlscale train --config`
reads). A space key `loss.weights.<task>` is that task's loss weight relative to classification (which stays 1.0);
it applies to the trials whose `loss.method` is `fixed` (uncertainty and dwa find their own weights). Extra arguments
`--section.key=value` override the base training config, `--sweep.key=value` the settings.

OUT is the Tune experiment directory: one `trial_<id>/` per trial whose `run/` is that trial's run directory
(checkpoints, TensorBoard, metrics.json), `sweep.yaml` (the sweep as run; `--resume` reads it) and, once every trial
has ended, `results.md` / `results.csv` (all trials, best first, both task metrics and the effective loss weights),
`pareto.png` (macro AUC against reconstruction MSE) and `best_config.yaml` (`dlscale train --config
OUT/best_config.yaml` retrains the winner into OUT/best_run). `tensorboard --logdir OUT` compares the trials' curves
and hparams side by side. On a multi-node cluster OUT must be storage that every node sees at the same path (NFS):
trials write their DeepSpeed checkpoints there.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlscale.config import Config, set_dotted, from_dict, save_config, to_dict

log = logging.getLogger(__name__)

SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
WEIGHT_KEY = "loss.weights."          # space keys `loss.weights.<task>`: weight relative to the reference task
REFERENCE_TASK = "classification"
TASK_METRICS = ("val/auc_macro", "val/recon_mse", "val/accuracy")
DEFAULT_SWEEP_FILE = Path(__file__).resolve().parents[1] / "tune" / "multitask.yaml"
SWEEP_RECORD = "sweep.yaml"
DRIVER_MEMORY = 256 * 2**20   # bytes reserved for the driver of a distributed trial (it needs no CPU of its own)


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

    def validate(self) -> "SweepSettings":
        choices = {"mode": ("max", "min"), "scheduler": ("asha", "fifo"), "search": ("random", "optuna")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"sweep.{key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
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

    def to_tree(self) -> dict:
        return {"sweep": dataclasses.asdict(self.settings), "space": {k: {kind: values} for k, (kind, values) in
                                                                      self.space.items()}, "train": to_dict(self.base)}


@dataclass(frozen=True)
class Resources:
    """What one trial holds: `workers` DeepSpeed ranks sharing `cpus` CPUs and `gpus` GPUs (per trial, in all)."""
    workers: int = 1
    cpus: float | None = None         # default: one per worker
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers-per-trial {self.workers}: expected >= 1")
        if self.cpus is not None and not self.cpus > 0 or self.gpus < 0:
            raise ValueError(f"--cpus-per-trial {self.cpus} / --gpus-per-trial {self.gpus}: expected > 0 / >= 0")
        if self.workers > 1 and self.gpus and self.gpus % self.workers:
            raise ValueError(f"--gpus-per-trial {self.gpus} with --workers-per-trial {self.workers}: every rank needs "
                             f"its own whole GPUs; use a multiple of {self.workers}")

    @property
    def trial_cpus(self) -> float:
        return self.cpus if self.cpus is not None else float(self.workers)

    def concurrency(self, cluster: Mapping[str, float], nodes: list[Mapping[str, float]] = ()) -> int:
        """How many trials fit the cluster (total resources, and those of each node) at once; raises if not even
        one does. A trial of one worker must fit one node; the workers of a larger trial may spread."""
        cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
        need = f"a trial needs {self.trial_cpus:g} CPU(s) and {self.gpus:g} GPU(s) ({self.workers} worker(s))"
        advice = "lower --workers-per-trial / --cpus-per-trial / --gpus-per-trial or use a larger cluster"
        if self.trial_cpus > cpus or self.gpus > gpus:
            raise ValueError(f"{need}; the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s): {advice}")
        each_cpus, each_gpus = self.trial_cpus / self.workers, self.gpus / self.workers
        if self.workers > 1 and each_cpus < 0.01:
            raise ValueError(f"{need}: {each_cpus:g} CPU per worker is too little")
        if nodes and not any(n.get("CPU", 0) >= each_cpus and n.get("GPU", 0) >= each_gpus for n in nodes):
            raise ValueError(f"{need}; no node of the Ray cluster has {each_cpus:g} CPU(s) and {each_gpus:g} GPU(s) "
                             f"for one {'trial' if self.workers == 1 else 'worker'}: {advice}")
        return int(min(cpus // self.trial_cpus, gpus // self.gpus if self.gpus else math.inf))


@dataclass(frozen=True)
class TrialJob:
    """What every trial process needs (shipped to it by Ray): the base config and where runs go."""
    base: Config
    out_dir: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


# ---- sweep file and search space ----------------------------------------------------------------------------------
def load_sweep(path: str | Path, overrides: list[str] | None = None, data_dir: str | None = None,
               trials: int | None = None) -> SweepSpec:
    """Read a sweep file; `overrides` are `--sweep.key=value` (settings) or `--section.key=value` (base training
    config). Everything is checked here, before Ray starts: an unknown key or a bad range raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict) or set(tree) - {"sweep", "space", "train"}:
        raise ValueError(f"{path}: expected a mapping with the sections sweep, space and train; got "
                         f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
    settings, base = dict(tree.get("sweep") or {}), to_dict(from_dict(Config, tree.get("train") or {}, "train."))
    for item in overrides or []:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected --section.key=value or --sweep.key=value")
        if key.startswith("sweep."):
            settings[key.removeprefix("sweep.")] = yaml.safe_load(raw)
        else:
            set_dotted(base, key, yaml.safe_load(raw))
    if trials is not None:
        settings["trials"] = trials
    if data_dir is not None:
        base["data_dir"] = str(Path(data_dir).resolve())
    settings = from_dict(SweepSettings, settings, "sweep.").validate()
    base_cfg = from_dict(Config, base)
    if base_cfg.stage != "multitask":
        raise ValueError(f"{path}: train.stage is {base_cfg.stage!r}; dlscale tune sweeps the multitask stage")
    if not base_cfg.data_dir:
        raise ValueError("no dataset: pass --data DIR")
    check_trial_config(base_cfg)
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
        if key.startswith(WEIGHT_KEY):
            _check_weight_key(where, key.removeprefix(WEIGHT_KEY), probes, base)
        for value in probes:
            try:
                check_trial_config(trial_config(base, {key: value}))
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
    tasks = model_tasks(base)
    if task == REFERENCE_TASK or task not in tasks:
        raise ValueError(f"{where}: loss.weights.<task> is a task's weight relative to {REFERENCE_TASK} (1.0); "
                         f"<task> must be one of this model's other tasks {[t for t in tasks if t != REFERENCE_TASK]}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in probes):
        raise ValueError(f"{where}: loss weights must be positive numbers, got {probes!r}")


def model_tasks(cfg: Config) -> tuple[str, ...]:
    from dlscale.models.multitask import stage_tasks
    return stage_tasks(cfg.stage, cfg.model.tasks, len(cfg.data.targets))


def trial_config(base: Config, params: Mapping[str, Any], run_dir: str | Path | None = None) -> Config:
    """The training config of one trial: `base` with the sampled `params` (dotted keys) set. Loss weights apply to
    `fixed` weighting only: sampled `loss.weights.<task>` ratios become {<task>: ratio, classification: 1.0, other
    tasks: their base weight or 1.0}; uncertainty and dwa get `loss.weights=None`."""
    tree = to_dict(base)
    ratios = {}
    for key, value in params.items():
        if key.startswith(WEIGHT_KEY):
            ratios[key.removeprefix(WEIGHT_KEY)] = float(value)
        else:
            set_dotted(tree, key, value)
    if run_dir is not None:
        tree["run_dir"] = str(run_dir)
    cfg = from_dict(Config, tree)
    if cfg.loss.method != "fixed":
        cfg.loss.weights = None
    elif ratios:
        tasks = model_tasks(cfg)
        weights = {**{t: 1.0 for t in tasks}, **(cfg.loss.weights or {}), **ratios, REFERENCE_TASK: 1.0}
        cfg.loss.weights = {t: weights[t] for t in tasks}
    return cfg


def check_trial_config(cfg: Config) -> None:
    """What `run` would reject at start-up, found before any trial starts."""
    from dlscale.train.weighting import build_weighting
    dataclasses.replace(cfg, run_dir=cfg.run_dir or "-", data_dir=cfg.data_dir or "-").validate()
    build_weighting(cfg.loss.method, model_tasks(cfg), cfg.loss.weights, cfg.loss.temperature)


def param_space(space: Mapping[str, tuple[str, list]]) -> dict:
    """Tune's search space (flat, dotted keys) from the checked space."""
    from ray import tune
    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: make[kind](values) for key, (kind, values) in space.items()}


# ---- one trial -----------------------------------------------------------------------------------------------------
def trial_dirname(trial) -> str:
    """Tune's `trial_dirname_creator`: short names, stable across `--resume`."""
    return f"trial_{trial.trial_id}"


def run_trial(params: dict, job: TrialJob) -> None:
    """The Tune trainable: one `dlscale.train.run` in this process, or a Ray Train job of `job.workers` ranks.

    The run directory inside the trial's directory is the trial's state: a retried or resumed trial continues from
    its latest checkpoint there (or from the Tune checkpoint, when the run directory is gone)."""
    from ray import tune
    from dlscale.dist import forget_launcher
    from dlscale.train import run
    from dlscale.train.engine import CHECKPOINTS
    run_dir = Path(job.out_dir) / f"trial_{tune.get_context().get_trial_id()}" / "run"
    if job.workers > 1:
        _run_distributed_trial(params, job, run_dir)
        return
    forget_launcher()
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None and not (run_dir / CHECKPOINTS / "latest").is_file():
        checkpoint.to_directory(str(run_dir / CHECKPOINTS))

    def report(epoch: int, metrics: dict, checkpoint_dir: Path) -> None:
        tune.report(tune_metrics(epoch, metrics), checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
    run(trial_config(job.base, params, run_dir), resume=run_dir.is_dir(), on_evaluation=report)


def _run_distributed_trial(params: dict, job: TrialJob, run_dir: Path) -> None:
    """A Ray Train TorchTrainer (gloo on CPU, NCCL on GPU) whose workers run DeepSpeed in Ray's process group;
    their reports reach Tune through TuneReportCallback. The run directory (shared storage) holds the checkpoints."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    per_worker = {"CPU": job.cpus_per_worker, **({"GPU": job.gpus_per_worker} if job.gpus_per_worker else {})}
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"params": params, "job": job, "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=job.workers, use_gpu=job.gpus_per_worker > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name="train", storage_path=str(run_dir.parent), callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=0)))   # Tune retries
    trainer.fit()


def _train_worker(loop_config: dict) -> None:
    import ray.train
    from dlscale.train import run
    job, run_dir = loop_config["job"], Path(loop_config["run_dir"])
    cfg = trial_config(job.base, loop_config["params"], run_dir)
    # every rank reads the directory before any rank creates it (the engine's first barrier comes first)
    run(cfg, resume=run_dir.is_dir(), on_evaluation=lambda epoch, metrics, _: ray.train.report(
        tune_metrics(epoch, metrics)))


def tune_metrics(epoch: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation (lists such as the confusion matrix left out) plus `epoch`, ASHA's clock."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["epoch"] = epoch
    return out


# ---- the sweep ----------------------------------------------------------------------------------------------------
def ray_temp_dir() -> Path:
    """Ray's session files: a short absolute path (its socket paths must stay under ~107 characters)."""
    return Path("/tmp" if os.path.isdir("/tmp") else os.path.expanduser("~")) / f"dlscale-ray-{os.getuid()}"


def node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the Ray this process is connected to."""
    import ray
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


@contextmanager
def ray_cluster(address: str | None = None, dashboard: bool = False) -> Iterator[dict[str, float]]:
    """Start a quiet local Ray (or connect to `address`) and shut it down on exit, whatever happens; yields the
    cluster's total resources. A Ray already initialised by the caller is used as it is and left running."""
    import ray
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR, "include_dashboard": dashboard}
    if address is None:   # a private local cluster on the loopback interface
        kwargs.update(_temp_dir=str(ray_temp_dir()), _node_ip_address="127.0.0.1")
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as err:
        raise ValueError(f"cannot join the Ray cluster at --address {address}: {err}. Clusters use token "
                         "authentication by default since Ray 2.59: set RAY_AUTH_MODE=token and give this machine "
                         "the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN_PATH)") from None
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def run_sweep(spec: SweepSpec, out_dir: Path, resources: Resources, cluster: Mapping[str, float],
              resume: bool = False, trial: Callable[[dict, TrialJob], None] = run_trial):
    """Run (or continue) the sweep on the Ray already started (`ray_cluster`); returns Tune's ResultGrid.
    `trial(params, job)` is the trainable (default `run_trial`; a wrapper can add behaviour around it)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    settings = spec.settings
    concurrent = resources.concurrency(cluster, node_resources())
    job = TrialJob(spec.base, str(out_dir), resources.workers, resources.trial_cpus / resources.workers,
                   resources.gpus / resources.workers)
    if resources.workers > 1:   # the trial only drives a TorchTrainer, whose workers hold the resources
        trial_resources = {"cpu": 0, "memory": DRIVER_MEMORY}
    else:
        trial_resources = {"cpu": resources.trial_cpus, "gpu": resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(trial, job=job), trial_resources)
    log.info("sweep %s: up to %d trial(s) at once on %s", out_dir, concurrent,
             ", ".join(f"{k}={v:g}" for k, v in sorted(cluster.items()) if k in ("CPU", "GPU")))
    if resume:
        with _quiet_tune():
            return tune.Tuner.restore(str(out_dir), trainable, resume_unfinished=True, resume_errored=True).fit()
    scheduler = None
    if settings.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=spec.base.schedule.epochs,
                                                  grace_period=settings.grace_period,
                                                  reduction_factor=settings.reduction_factor)
    if settings.search == "optuna":   # TuneConfig(max_concurrent_trials) wraps a Searcher in a ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        searcher, limit = OptunaSearch(seed=settings.seed), concurrent
    else:                             # ... but ignores it for the random search, which takes it itself
        searcher, limit = tune.search.BasicVariantGenerator(max_concurrent=concurrent, random_state=settings.seed), None
    tuner = tune.Tuner(
        trainable, param_space=param_space(spec.space),
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, num_samples=settings.trials,
                                    scheduler=scheduler, search_alg=searcher, max_concurrent_trials=limit,
                                    trial_dirname_creator=trial_dirname,
                                    # a process serves trial after trial: torch is imported once. Not for a trial
                                    # that drives a TorchTrainer: it outlasts Tune's 2 s wait for reuse, and Tune
                                    # then fails the next trial
                                    reuse_actors=resources.workers == 1),
        run_config=tune.RunConfig(
            name=out_dir.name, storage_path=str(out_dir.parent), verbose=0,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback()]))
    with _quiet_tune():
        return tuner.fit()


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's driver reads these while it runs: no console tables (Tune prints its experiment box even at
    verbose=0 with the new output engine) and no TBXLoggerCallback (each trial's run/tb already holds its curves
    and hparams; a second copy would double every trial in TensorBoard)."""
    saved = {k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")}
    os.environ.update(RAY_AIR_NEW_OUTPUT="0", TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


# ---- results ------------------------------------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    trial: str
    status: str                  # completed | stopped early | failed
    params: dict
    metrics: dict                # the last reported evaluation
    error: str = ""

    @property
    def epoch(self) -> int:
        return int(self.metrics.get("epoch", 0))

    def value(self, key: str) -> float:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def trials_left(spec: SweepSpec, out_dir: Path) -> int:
    """Trials of the sweep that had not ended when `fit` returned (0 unless Ctrl-C stopped it), as Tune saved the
    sweep on disk: the state `--resume` continues. (The ResultGrid of an interrupted `fit` cannot tell: it shows the
    trials it stopped as terminated and leaves out those it never started.)"""
    from ray.tune import ExperimentAnalysis
    grid = math.prod(len(values) for kind, values in spec.space.values() if kind == "grid")
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(out_dir)).trials)
    return spec.settings.trials * grid - ended


def outcomes(results, epochs: int) -> list[TrialOutcome]:
    """One `TrialOutcome` per trial of the ResultGrid of a sweep whose trials have all ended."""
    out = []
    for result in results:
        metrics = dict(result.metrics or {})
        if result.error is not None:
            status = "failed"
        else:   # ended without error: all its epochs, or the scheduler stopped it
            status = "completed" if int(metrics.get("epoch", 0)) >= epochs else "stopped early"
        out.append(TrialOutcome(Path(result.path).name, status, dict(result.config or {}), metrics,
                                _error_text(result.error)))
    return out


def _error_text(error: BaseException | None) -> str:
    """One line naming what went wrong in the trial (Ray wraps it: RayTaskError.cause is the trial's own error)."""
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]


def ranked(trials: list[TrialOutcome], metric: str, mode: str) -> list[TrialOutcome]:
    """Best first, ties broken by the other task's metric (reconstruction MSE, or macro AUC when ranking by MSE);
    trials without the metric last."""
    sign = -1.0 if mode == "max" else 1.0
    other, other_sign = ("val/auc_macro", -1.0) if metric == "val/recon_mse" else ("val/recon_mse", 1.0)

    def key(t: TrialOutcome):
        v, w = t.value(metric), t.value(other)
        return (math.isnan(v), 0.0 if math.isnan(v) else sign * v, math.isnan(w), 0.0 if math.isnan(w) else
                other_sign * w)
    return sorted(trials, key=key)


def pareto_front(trials: list[TrialOutcome]) -> list[TrialOutcome]:
    """Trials no other beats on both macro AUC (higher) and reconstruction MSE (lower), lowest MSE first."""
    points = [t for t in trials
              if not math.isnan(t.value("val/auc_macro")) and not math.isnan(t.value("val/recon_mse"))]
    front = [t for t in points if not any(
        o.value("val/auc_macro") >= t.value("val/auc_macro") and o.value("val/recon_mse") <= t.value("val/recon_mse")
        and (o.value("val/auc_macro"), o.value("val/recon_mse")) != (t.value("val/auc_macro"), t.value("val/recon_mse"))
        for o in points)]
    return sorted(front, key=lambda t: t.value("val/recon_mse"))


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table_rows(trials: list[TrialOutcome], spec: SweepSpec) -> tuple[list[str], list[list]]:
    """Columns and rows of the results table: swept values, both task metrics, the effective loss weights."""
    metrics = [spec.settings.metric] + [m for m in TASK_METRICS if m != spec.settings.metric]
    tasks = model_tasks(spec.base)
    columns = ["rank", "trial", "status", "epochs", *spec.space, *metrics, *(f"weight {t}" for t in tasks), "error"]
    rows = []
    for rank, t in enumerate(trials, 1):
        method = t.params.get("loss.method", spec.base.loss.method)
        params = [("-" if k.startswith(WEIGHT_KEY) and method != "fixed" else t.params.get(k, "-"))
                  for k in spec.space]
        rows.append([rank, t.trial, t.status, t.epoch, *params, *(t.value(m) for m in metrics),
                     *(t.value(f"train/weight_{task}") for task in tasks), t.error])
    return columns, rows


def write_results(trials: list[TrialOutcome], spec: SweepSpec, out_dir: Path) -> str:
    """results.md, results.csv, pareto.png, best_config.yaml and TensorBoard hparams for trials stopped early;
    returns the summary that is printed."""
    settings = spec.settings
    trials = ranked(trials, settings.metric, settings.mode)
    columns, rows = table_rows(trials, spec)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[("" if isinstance(v, float) and math.isnan(v) else v) for v in row] for row in rows])
    scored = [t for t in trials if not math.isnan(t.value(settings.metric)) and t.status != "failed"]
    lines = [f"# Sweep {out_dir.name}: {len(trials)} trials ranked by {settings.metric} ({settings.mode})", ""]
    if scored:
        best = scored[0]
        best_cfg = trial_config(spec.base, best.params, out_dir / "best_run")
        save_config(best_cfg, out_dir / "best_config.yaml")
        lines += _headline(best, best_cfg, trials, settings.metric, out_dir)
    else:
        lines += ["No trial reported the metric: see the errors below and the trials' error.txt.", ""]
    show = [c for c in columns if c != "error"]
    lines += ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    lines += ["| " + " | ".join(_text(v) for c, v in zip(columns, row) if c != "error") + " |" for row in rows]
    failed = [t for t in trials if t.status == "failed"]
    if failed:
        lines += ["", f"## Failed trials (after {settings.max_failures} retries)", ""]
        lines += [f"- {t.trial}: {t.error} (see {out_dir / t.trial / 'error.txt'})" for t in failed]
    summary = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(summary)
    pareto_plot(trials, out_dir / "pareto.png", best=scored[0] if scored else None)
    for t in trials:
        if t.status == "stopped early":
            write_stopped_hparams(t, spec, out_dir)
    return summary


def _headline(best: TrialOutcome, best_cfg: Config, trials: list[TrialOutcome], metric: str, out_dir: Path) -> list:
    weights = ", ".join(f"{k.removeprefix('train/weight_')} {v:.3g}" for k, v in best.metrics.items()
                        if k.startswith("train/weight_"))
    shown = [metric] + [m for m in ("val/auc_macro", "val/recon_mse") if m != metric]
    lines = [f"**Best: {best.trial}** ({best.status}, {best.epoch} epochs), {_describe(best_cfg, best.params)}",
             "- " + ", ".join(f"{m} {_text(best.value(m))}" for m in shown) +
             f"; effective loss weights: {weights or 'n/a'}"]
    completed = [t for t in trials if t.status == "completed" and not math.isnan(t.value("val/recon_mse"))]
    if completed and not math.isnan(best.value("val/recon_mse")):
        lowest = min(completed, key=lambda t: t.value("val/recon_mse"))
        ratio = best.value("val/recon_mse") / lowest.value("val/recon_mse")
        if lowest is best:
            lines.append("- reconstruction cost: none, it also has the lowest val/recon_mse of the completed trials")
        else:
            lines.append(f"- reconstruction cost: its val/recon_mse is {ratio:.2f}x the lowest of the completed "
                         f"trials ({lowest.value('val/recon_mse'):.4g}, {lowest.trial}, loss.method="
                         f"{lowest.params.get('loss.method', best_cfg.loss.method)})")
    per_method: dict[str, TrialOutcome] = {}
    for t in trials:
        if t.status != "failed" and not math.isnan(t.value(metric)):
            per_method.setdefault(str(t.params.get("loss.method", best_cfg.loss.method)), t)
    lines += ["", "Best trial of each weighting method:", "", "| loss.method | trial | status | " + " | ".join(shown)
              + " |", "|---|---|---|" + "---|" * len(shown)]
    lines += [f"| {m} | {t.trial} | {t.status} | " + " | ".join(_text(t.value(k)) for k in shown) + " |"
              for m, t in per_method.items()]
    lines += ["", f"Retrain the winner: `dlscale train --config {out_dir / 'best_config.yaml'}` (into "
              f"{out_dir / 'best_run'}; --run-dir to choose another). Pareto front: {out_dir / 'pareto.png'}.", ""]
    return lines


def _describe(cfg: Config, params: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if not k.startswith(WEIGHT_KEY)}
    shown.setdefault("loss.method", cfg.loss.method)
    if cfg.loss.weights:
        shown["loss.weights"] = {k: round(v, 4) for k, v in cfg.loss.weights.items()}
    return ", ".join(f"{k}={_text(v)}" for k, v in shown.items())


def pareto_plot(trials: list[TrialOutcome], path: Path, best: TrialOutcome | None = None) -> None:
    """Macro AUC against reconstruction MSE, one point per trial (hollow: stopped early), coloured by weighting
    method; the line joins the completed trials that no other completed trial beats on both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [t for t in trials if t.status in ("completed", "stopped early")
             and not math.isnan(t.value("val/auc_macro")) and not math.isnan(t.value("val/recon_mse"))]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    methods = sorted({str(t.params.get("loss.method", "")) for t in shown})
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for method in methods:
        for status, fill in (("completed", True), ("stopped early", False)):
            group = [t for t in shown if str(t.params.get("loss.method", "")) == method and t.status == status]
            if group:
                ax.scatter([t.value("val/recon_mse") for t in group], [t.value("val/auc_macro") for t in group],
                           s=40, edgecolors=colours[method], facecolors=colours[method] if fill else "none",
                           label=f"{method or 'base'} ({status})")
    front = pareto_front([t for t in shown if t.status == "completed"])
    if front:
        ax.plot([t.value("val/recon_mse") for t in front], [t.value("val/auc_macro") for t in front], "k--", lw=1,
                drawstyle="steps-post", label="Pareto front (completed)")
    if best is not None and best in shown:
        ax.scatter([best.value("val/recon_mse")], [best.value("val/auc_macro")], marker="*", s=320, c="gold",
                   edgecolors="k", zorder=0, label=f"best: {best.trial}")
    ax.set_xlabel("val/recon_mse (lower is better)")
    ax.set_ylabel("val/auc_macro (higher is better)")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_stopped_hparams(trial: TrialOutcome, spec: SweepSpec, out_dir: Path) -> None:
    """A trial stopped early never reaches the engine's own hparams record: write it, in the same form and place,
    from its last evaluation (once; `stopped.json` beside it records the stop)."""
    from torch.utils.tensorboard import SummaryWriter
    from dlscale.report import write_json
    from dlscale.train.engine import write_hparams
    run_dir = out_dir / trial.trial / "run"
    if not run_dir.is_dir() or (run_dir / "stopped.json").is_file():
        return
    with SummaryWriter(str(run_dir / "tb")) as writer:
        write_hparams(writer, trial_config(spec.base, trial.params, run_dir), trial.metrics)
    write_json(run_dir / "stopped.json", {"stopped_after_epoch": trial.epoch, "by": spec.settings.scheduler,
                                          "metrics": trial.metrics})


# ---- command line -------------------------------------------------------------------------------------------------
def tune_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlscale tune", description="Search the multi-task loss weighting (and any training setting) with Ray "
        "Tune. Extra --section.key=value set the base training config, --sweep.key=value the sweep settings.")
    p.add_argument("--data", help="dataset directory (manifest.json + shards)")
    p.add_argument("--out", required=True, type=Path, help="sweep directory (new, or the one to --resume)")
    p.add_argument("--config", type=Path, help=f"sweep file (default {DEFAULT_SWEEP_FILE})")
    p.add_argument("--trials", type=int, help="configurations to sample (default: sweep.trials of the file)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DeepSpeed ranks per trial (Ray Train)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, shared by its workers")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial, shared by its workers (default: 1 each)")
    p.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        p.error(f"unrecognised arguments {bad}; config overrides look like --section.key=value")
    out_dir = args.out.resolve()
    resources = Resources(args.workers_per_trial, args.cpus_per_trial, args.gpus_per_trial)
    if args.resume:
        if args.config or args.trials or rest:
            raise ValueError(f"--resume continues the sweep as recorded in {out_dir / SWEEP_RECORD}; drop --config, "
                             "--trials and overrides")
        if not (out_dir / SWEEP_RECORD).is_file():
            raise FileNotFoundError(f"{out_dir}: no {SWEEP_RECORD}, nothing to resume")
        spec = load_sweep(out_dir / SWEEP_RECORD)
        if args.data and Path(args.data).resolve() != Path(spec.base.data_dir):
            raise ValueError(f"--data {args.data}: this sweep trains on {spec.base.data_dir}")
    else:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ValueError(f"sweep directory {out_dir} exists; pass --resume to continue its sweep, or choose a new "
                             "--out")
        spec = load_sweep(args.config or DEFAULT_SWEEP_FILE, rest, args.data, args.trials)
    _check_dataset(spec.base)
    # Ray Train frees the workers of a trial that ASHA stopped through Ray's state API, which the dashboard serves
    state_api = resources.workers > 1 and spec.settings.scheduler == "asha"
    if state_api and args.address is None:
        _check_state_api()
    with ray_cluster(args.address, dashboard=state_api) as cluster:
        resources.concurrency(cluster, node_resources())   # a trial that cannot fit fails here, before any starts
        if not args.resume:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / SWEEP_RECORD).write_text(yaml.safe_dump(spec.to_tree(), sort_keys=False))
        from ray import tune
        if args.resume and not tune.Tuner.can_restore(str(out_dir)):
            raise FileNotFoundError(f"{out_dir}: no Tune experiment state to resume; start the sweep again")
        results = run_sweep(spec, out_dir, resources, cluster, args.resume)
    left = trials_left(spec, out_dir)
    if left:
        print(f"sweep interrupted with {left} trial(s) to go; continue it with\n  dlscale tune --out {out_dir} "
              "--resume", flush=True)
        return 130
    trials = outcomes(results, spec.base.schedule.epochs)
    print(write_results(trials, spec, out_dir), flush=True)
    return 0 if any(t.status != "failed" for t in trials) else 1


def _check_state_api() -> None:
    try:
        importlib.import_module("ray.dashboard.modules.state.state_head")
    except ImportError:
        raise ValueError("ASHA with --workers-per-trial > 1 needs Ray's state API to free the workers of the trials "
                         "it stops: pip install 'ray[default]' (or use --sweep.scheduler=fifo)") from None


def _check_dataset(cfg: Config) -> None:
    from dlscale.data.shards import load_manifest
    from dlscale.train.engine import check_dataset
    check_dataset(cfg, load_manifest(cfg.data_dir))
