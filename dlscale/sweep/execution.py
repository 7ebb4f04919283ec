"""Running a sweep on Ray Tune: trial resources, the trainable (one `dlscale.train.run`, or a Ray Train job of
several DeepSpeed ranks), the quiet local cluster, and the Tuner.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlscale.distributed import environment, forget_launcher, set_env
from dlscale.sweep.spec import SweepSpec, param_space, trial_config
from dlscale.train import run
from dlscale.train.checkpoint import CHECKPOINTS
from dlscale.train.config import Config
from dlscale.train.deepspeed_setup import prepare_process

log = logging.getLogger(__name__)
DRIVER_MEMORY = 256 * 2**20   # bytes reserved for the driver of a distributed trial (it needs no CPU of its own)


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


def trial_dirname(trial) -> str:
    """Tune's `trial_dirname_creator`: short names, stable across `--resume`."""
    return f"trial_{trial.trial_id}"


def run_trial(params: dict, job: TrialJob) -> None:
    """The Tune trainable: one `dlscale.train.run` in this process, or a Ray Train job of `job.workers` ranks.

    The run directory inside the trial's directory is the trial's state: a retried or resumed trial continues from
    its latest checkpoint there (or from the Tune checkpoint, when the run directory is gone)."""
    from ray import tune
    run_dir = Path(job.out_dir) / f"trial_{tune.get_context().get_trial_id()}" / "run"
    if job.workers > 1:
        _run_distributed_trial(params, job, run_dir)
        return
    forget_launcher()
    _prepare(job)
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
    job, run_dir = loop_config["job"], Path(loop_config["run_dir"])
    _prepare(job)
    cfg = trial_config(job.base, loop_config["params"], run_dir)
    # every rank reads the directory before any rank creates it (the engine's first barrier comes first)
    run(cfg, resume=run_dir.is_dir(), on_evaluation=lambda epoch, metrics, _: ray.train.report(
        tune_metrics(epoch, metrics)))


def _prepare(job: TrialJob) -> None:
    """A trial's process is a training entry point: its DeepSpeed accelerator is chosen here, once."""
    prepare_process(job.base.device)


def tune_metrics(epoch: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation (lists such as the confusion matrix left out) plus `epoch`, ASHA's clock."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["epoch"] = epoch
    return out


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
    set_env("RAY_USAGE_STATS_ENABLED", "0", default_only=True)
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


def _quiet_tune():
    """Tune's driver reads these while it runs: no console tables (Tune prints its experiment box even at
    verbose=0 with the new output engine) and no TBXLoggerCallback (each trial's run/tb already holds its curves
    and hparams; a second copy would double every trial in TensorBoard)."""
    return environment(RAY_AIR_NEW_OUTPUT="0", TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1")
