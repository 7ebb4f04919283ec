"""Evaluation of a run, shared by training (`Trainer.finish`, sweeps) and `dlscale eval`.

Every sample of the split is scored exactly once across ranks; scores are gathered once, after the loop; rank 0
computes the metrics (scikit-learn), fits the linear probe, writes metrics.json, scores_<split>.npz, the ROC
figure and TensorBoard entries, and shares the metrics with every rank. A failure on rank 0 is shared too, so no
rank waits forever.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dlscale import io
from dlscale.collect import FEATURE_KEYS, collect, gather
from dlscale.compat import format_version, upgrade_model_state
from dlscale.configtree import flatten, read_yaml, to_dict
from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.data.stream import eval_loader
from dlscale.data.transforms import finish_batch
from dlscale.distributed import DistInfo, dist_info
from dlscale.metrics import (apply_temperature, expected_calibration_error, fit_temperature,
                             negative_log_likelihood, summarize)
from dlscale.export import check_weights_fit, read_encoder_file
from dlscale.figures import save_reliability, save_roc
from dlscale.summaries import log_evaluation, scalar_items
from dlscale.train.artifacts import METRICS, update_metrics
from dlscale.train.config import Config, load_config, run_tasks
from dlscale.train.data import load_dataset, resolve_transforms
from dlscale.train.deepspeed_setup import init_distributed, pick_device
from dlscale.train.model import build_run_model
from dlscale.train.probe_set import pick_probe_rows, probe_quota, probe_shard_count
from dlscale.train.skipped import skip_metrics
from dlscale.train.sources.two_stream import TARGET_PREFIX, target_config

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What one evaluation reads and where it writes (rank 0)."""
    cfg: Config
    manifest: dict
    info: DistInfo
    device: torch.device
    dtype: torch.dtype
    out_dir: Path
    writer: object = None
    prefix: str = ""
    """before every metric key and file name: "target/" for the target domain (`target/val/accuracy`)"""
    target: "Evaluation | None" = None
    """the target domain's evaluation (`data.target` with `evaluate`), run after this one"""


def target_evaluation(ev: Evaluation) -> Evaluation | None:
    """The evaluation of the run's target domain (`data.target`: its dataset, read with the run's data settings;
    labels used for scoring only), or None when the run has none or `data.target.evaluate` is off."""
    cfg = ev.cfg
    if not (cfg.data.target.source and cfg.data.target.evaluate):
        return None
    tcfg = target_config(cfg)
    return Evaluation(tcfg, load_manifest(tcfg.data_dir), ev.info, ev.device, ev.dtype, ev.out_dir, ev.writer,
                      prefix=TARGET_PREFIX)


def evaluate_with_target(model, ev: Evaluation, split: str, probe: bool, step: int = 0,
                         probe_train: tuple[dict | None, dict] | None = None) -> dict:
    """`evaluate_split` of the run's data, then of its target domain's (`target/<split>/...`, with its own probe)
    when the run has one."""
    metrics, _ = evaluate_split(model, ev, split, probe, step, probe_train)
    if ev.target is not None:
        probe_target = probe and "train" in ev.target.manifest["splits"]
        metrics = {**metrics, **evaluate_split(model, ev.target, split, probe_target, step)[0]}
    return metrics


def share_buffers(model: torch.nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), the ones model.pt holds. On CPU each rank
    keeps its own (SyncBatchNorm has no CPU kernel), and a rank scoring its share of a split with its own would
    score it with another model than the one exported."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


@contextmanager
def rank0_buffers(model: torch.nn.Module, world: int):
    """Evaluate with rank 0's buffers (`share_buffers`), then give each rank its own back: training goes on with
    them, as without the evaluation."""
    own = [buffer.detach().clone() for buffer in model.buffers()] if world > 1 else []
    share_buffers(model, world)
    try:
        yield
    finally:
        for buffer, saved in zip(model.buffers(), own):
            buffer.data.copy_(saved)


def evaluate_split(model, ev: Evaluation, split: str, probe: bool, step: int = 0,
                   probe_train: tuple[dict | None, dict] | None = None) -> tuple[dict, dict]:
    """Metrics of `model` on the whole `split` and, with `probe`, the linear probe on frozen train features
    (`probe_train`: those of `probe_features`, if already computed)."""
    cfg, info = ev.cfg, ev.info
    scores = gather(collect_on_every_rank(model, eval_loader(cfg.data_dir, cfg.data, info.rank, info.world, split),
                                          ev, split))
    train_features, skips = (probe_train or probe_features(model, ev)) if probe else (None, {})
    calibration = None
    if cfg.eval.calibration_split not in (None, split) and "probs" in scores:
        loader = eval_loader(cfg.data_dir, cfg.data, info.rank, info.world, cfg.eval.calibration_split)
        calibration = gather(collect_on_every_rank(model, loader, ev, cfg.eval.calibration_split, n_examples=0))
    outcome: list = [None]
    if info.is_main:
        try:
            outcome = [report_split(ev, split, scores, train_features, step, skips, calibration)]
        except Exception as err:
            outcome = [f"evaluation on rank 0 failed: {type(err).__name__}: {err}"]
            if info.world > 1:
                dist.broadcast_object_list(outcome, src=0)
            raise
    if info.world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise RuntimeError(outcome[0])
    return outcome[0], scores


def probe_features(model, ev: Evaluation, whole_split: bool = False) -> tuple[dict | None, dict]:
    """The frozen features of the probe's train set, gathered on every rank (None with `eval.probe_samples=0`), and
    the skip counts of reading it: the first `probe_samples / classes` training samples of each class in id order
    (`probe_set`), read from the leading shards that hold them, so the same set whatever the ranks and workers
    (`whole_split`: the whole train split instead). Read tolerantly unless `data.strict`: a corrupt train shard is
    skipped and counted in `probe/skipped_*`."""
    cfg, info = ev.cfg, ev.info
    if cfg.eval.probe_samples <= 0 and not whole_split:
        return None, {}
    train, classes = ev.manifest["splits"]["train"], ev.manifest["classes"]
    quota = None if whole_split else probe_quota(cfg.eval.probe_samples,
                                                 {c: train["class_counts"].get(c, 0) for c in classes})
    loader = eval_loader(cfg.data_dir, cfg.data, info.rank, info.world, "train", tolerant=not cfg.data.strict,
                         shard_limit=probe_shard_count(train["shards"], classes, quota))
    features = gather(collect_on_every_rank(model, loader, ev, "train", n_examples=0))
    rows = pick_probe_rows(features["labels"], classes, quota) if features else []
    features = {k: v[rows] for k, v in features.items()}
    return features, skip_metrics(loader.dataset, "probe", "the linear probe's train features", ev.device)


def finalize_heads(model, ev: Evaluation, train_features: dict | None, hook: str = "finalize") -> dict:
    """Each task's end-of-training adjustment of its head (`Task.finalize`; `hook` initialize: its fit before the
    first step, `Task.initialize`) on the probe's train features; rank 0's result is then broadcast, so every rank
    evaluates and exports (or starts training) the same head."""
    if train_features is None:
        return {}
    metrics = {}
    for name, task in model.task_specs.items():
        metrics.update(getattr(task, hook)(model.heads[name], train_features))
    if ev.info.world > 1 and metrics:
        for tensor in [*model.heads.parameters(), *model.heads.buffers()]:
            dist.broadcast(tensor.data, src=0)
    return metrics


def head_fit_features(model, ev: Evaluation, probe_train: dict | None) -> dict | None:
    """The features `finalize_heads` fits to: the probe's train set; in a run without a probe
    (`eval.probe_samples=0`), the whole train split when a task's head asks for a fit (`Task.finalizes`), else None."""
    if probe_train is not None or not any(task.finalizes() for task in model.task_specs.values()):
        return probe_train
    return probe_features(model, ev, whole_split=True)[0]


def initialize_heads(model, ev: Evaluation) -> dict:
    """The heads of tasks that start from a fit (`Task.initializes`: LP-FT's probe head) fitted to the eval-mode
    features of the probe's train set, before the engine copies the weights into its optimiser; of the whole train
    split in a run without a probe (`eval.probe_samples=0`: e.g. a regression run on the axion images alone, one
    class, which no classification probe can fit)."""
    if not any(task.initializes() for task in model.task_specs.values()):
        return {}
    return finalize_heads(model, ev, probe_features(model, ev, whole_split=ev.cfg.eval.probe_samples <= 0)[0],
                          hook="initialize")


class EvaluationError(ValueError):
    """A split could not be evaluated on some rank (a corrupt shard of a split that must be read whole)."""


def collect_on_every_rank(model, loader, ev: Evaluation, split: str, **options) -> dict:
    """`collect` on this rank; a failure on any rank (a corrupt shard) raises on every rank, naming it, instead of
    leaving the others waiting in the gather."""
    error = None
    try:
        arrays = collect(model, loader, ev.device, ev.dtype,
                         finish=lambda batch: finish_batch(batch, ev.cfg.data, ev.device, ev.dtype), **options)
    except Exception as err:
        arrays, error = {}, f"rank {ev.info.rank}: {type(err).__name__}: {err}"
    errors = [error]
    if ev.info.world > 1:
        errors = [None] * ev.info.world
        dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise EvaluationError(f"evaluating split {split!r} failed: " + "; ".join(failed))
    return arrays


def report_split(ev: Evaluation, split: str, scores: dict, train_features: dict | None, step: int,
                 extra: dict | None = None, calibration: dict | None = None) -> dict:
    expected = ev.manifest["splits"][split]["samples"]
    if len(scores["labels"]) != expected:
        raise RuntimeError(f"evaluated {len(scores['labels'])} samples of split {split!r}, the manifest has "
                           f"{expected}: the eval stream lost or repeated samples")
    cfg = ev.cfg
    metrics = summarize(scores, train_features, CLASSES, split, cfg.data.targets, cfg.eval.n_bootstrap, cfg.seed)
    metrics.update(extra or {})
    if calibration is not None:
        metrics.update(temperature_metrics(calibration, scores, split, cfg.eval.calibration_split))
    metrics = {f"{ev.prefix}{key}": value for key, value in metrics.items()}
    metrics["step"] = step
    update_metrics(ev.out_dir / METRICS, metrics)
    tag = ev.prefix.replace("/", "_")   # target_
    io.atomic_write(ev.out_dir / f"scores_{tag}{split}.npz",
                    lambda f: np.savez(f, **{k: v for k, v in scores.items() if k not in FEATURE_KEYS}))
    if "probs" in scores:
        suffix = "" if split == "val" and not tag else f"_{tag}{split}"
        save_roc(ev.out_dir / f"roc{suffix}.png", {cfg.stage: (scores["probs"], scores["labels"])}, CLASSES)
        save_reliability(ev.out_dir / f"reliability{suffix}.png", {cfg.stage: (scores["probs"], scores["labels"])})
    if ev.writer is not None:
        log_evaluation(ev.writer, step, metrics, scores, CLASSES, ev.prefix + split)
    return metrics


def temperature_metrics(calibration: dict, scores: dict, split: str, calibration_split: str) -> dict:
    """A softmax temperature fitted on `calibration_split`'s scores, applied to `split`'s: its ECE and NLL before
    and after (the argmax, so the accuracy, is unchanged by a temperature)."""
    temperature = fit_temperature(calibration["probs"], calibration["labels"])
    calibrated = apply_temperature(scores["probs"], temperature)
    return {f"{split}/temperature": temperature, f"{split}/temperature_fitted_on": calibration_split,
            f"{split}/ece_calibrated": expected_calibration_error(calibrated, scores["labels"]),
            f"{split}/nll": negative_log_likelihood(scores["probs"], scores["labels"]),
            f"{split}/nll_calibrated": negative_log_likelihood(calibrated, scores["labels"])}


def write_hparams(writer, cfg: Config, metrics: dict) -> None:
    """The run's TensorBoard hparams record (in the writer's own directory): every scalar config value, dotted,
    against the scalar metrics. Sweeps write it for trials stopped before the run finished."""
    hparams = {k: v for k, v in flatten(to_dict(cfg)).items() if isinstance(v, (int, float, str, bool))}
    writer.add_hparams(hparams, {k: v for k, v in scalar_items(metrics).items() if not k.endswith("n_samples")},
                       run_name=".")


def load_run(run_dir: str | Path, data_dir: str | None = None) -> tuple[Config, torch.nn.Module, dict]:
    """A finished run's config (pointed at `data_dir` if given), its model with the trained weights, and its
    exported encoder's metadata."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir}: no model.pt; only finished runs can be evaluated")
    cfg = load_config(run_dir / "config.yaml", data_dir=data_dir, run_dir=str(run_dir))   # the run may have moved
    info = read_encoder_file(run_dir)
    shape = tuple(info["image_shape"])
    model = build_run_model(cfg, shape, info.get("target_stats"))
    version = format_version(read_yaml(run_dir / "config.yaml"), f"{run_dir / 'config.yaml'}")
    state = upgrade_model_state(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True), version)
    check_weights_fit(model, state, f"the model in {run_dir / 'config.yaml'} does not fit the weights in "
                                    f"{run_dir / 'model.pt'}")
    model.load_state_dict(state)
    log.info("loaded %s (stage %s, tasks %s)", run_dir, cfg.stage, "+".join(run_tasks(cfg)))
    return cfg, model, info


def eval_dir(run_dir: Path, cfg_data_dir: str, data_dir: str | None, split: str) -> Path:
    """Where `dlscale eval` writes: the run directory itself for the run's own dataset, else
    RUN/eval/<dataset>-<split>/, so the record of the run's own validation is never replaced."""
    if data_dir is None or Path(data_dir).resolve() == Path(cfg_data_dir).resolve():
        return run_dir
    return run_dir / "eval" / f"{Path(data_dir).resolve().name}-{split}"


def evaluate_run(run_dir: str | Path, data_dir: str | None = None, split: str = "val",
                 local_rank: int | None = None) -> tuple[dict, Path]:
    """`dlscale eval`: reload a finished run and evaluate it on `split` of `data_dir` (default: its own data);
    returns (metrics, the directory they were written to)."""
    run_dir = Path(run_dir)
    trained_on = load_config(run_dir / "config.yaml").data_dir if (run_dir / "config.yaml").is_file() else ""
    cfg, model, _ = load_run(run_dir, data_dir)
    manifest, _ = load_dataset(cfg)
    if split not in manifest["splits"]:
        raise ValueError(f"{cfg.data_dir}: no split {split!r} (has {', '.join(manifest['splits'])})")
    info = dist_info(local_rank)
    device = pick_device(cfg.device)
    cfg = resolve_transforms(cfg, device)
    init_distributed(info, device)
    out_dir = eval_dir(run_dir, trained_on, data_dir, split)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ev = Evaluation(cfg, manifest, info, device, torch.float32, out_dir)
    metrics, _ = evaluate_split(model.to(device), ev, split, probe=True)
    return metrics, out_dir
