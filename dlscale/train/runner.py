"""One `run(config)` for every way of launching a training stage.

    dlscale train --stage supervised --data shards/ --run-dir runs/resnet18               # one process
    torchrun --standalone --nproc_per_node 8 launch/train.py --stage multitask ...        # one node, 8 GPUs
    deepspeed --hostfile launch/hostfile launch/train.py --stage multitask ...            # several nodes
    sbatch launch/slurm.sbatch                                                            # SLURM (srun)
    dlscale.train.run(config)                                                             # Ray Tune trials

Everything that can be checked (config, weighting, data, init_from, engine settings) is checked before the run
directory is created; then the model, stream and DeepSpeed engine are built and handed to the `Trainer`. The stop
signals (`schedule.preempt_signals`, `dlscale.preemption`) are caught from here on, in this one place.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from dlscale import preemption
from dlscale.data.classes import CLASSES
from dlscale.distributed import DistInfo, dist_info
from dlscale.models.adapters import add_adapters
from dlscale.train import adabn, artifacts
from dlscale.train.config import Config
from dlscale.train.data import (load_dataset, prepare_eval_set, prepare_target_eval_set,
                                resolve_transforms, simulated_eval_set, stream_image_shape, target_stats, train_stream)
from dlscale.train.sources.simulate import EVAL_DATA
from dlscale.train.sources.two_stream import TARGET_EVAL_DATA, simulated_target_set
from dlscale.train.deepspeed_setup import init_distributed, make_engine, pick_device, resolve_precision
from dlscale.train.trainer import DTYPES, EvaluationCallback, Trainer
from dlscale.train.evaluation import Evaluation, initialize_heads, target_evaluation
from dlscale.train.model import build_run_model, init_encoder
from dlscale.train.preflight import check_engine_settings, check_target
from dlscale.train.watchdog import exit_with_launcher

log = logging.getLogger(__name__)


def run(cfg: Config, resume: bool = False, local_rank: int | None = None,
        on_evaluation: EvaluationCallback | None = None) -> dict:
    """Train one stage end to end (validate, train, checkpoint, export, evaluate); return the final metrics (every
    rank). Everything that can be checked is checked before the run directory is created.

    `on_evaluation(epoch, metrics, checkpoint_dir)` is called on every rank after each evaluation (Ray Tune
    reports through it). The process group outlives the call (DeepSpeed caches its groups), so runs can follow
    each other in one process. The caller's process set-up (`deepspeed_setup.prepare_process`) comes first.

    A stop signal (`schedule.preempt_signals`) raises `dlscale.preemption.Preempted` on every rank once a complete
    checkpoint is written; the entry points exit with `PREEMPTED_EXIT_CODE`.
    """
    cfg.check_inputs()
    drill = preemption.drill_from_env()   # a malformed DLSCALE_SIGNAL_AT_STEP fails before anything is created
    with preemption.listen(cfg.schedule.preempt_signals):
        return _run(cfg, resume, local_rank, on_evaluation, drill)


def _run(cfg: Config, resume: bool, local_rank: int | None, on_evaluation: EvaluationCallback | None,
         drill: preemption.Drill | None) -> dict:
    """`run` once the stop signals are caught."""
    info, device, run_dir = dist_info(local_rank), pick_device(cfg.device), Path(cfg.run_dir)
    exit_with_launcher(info.rank)
    artifacts.check_new(run_dir, resume)
    simulated_eval = simulated_eval_set(cfg)
    cfg = resolved(cfg, device, simulated_eval)
    if not simulated_eval:
        load_dataset(cfg)
    stream, batches = train_stream(cfg, info, device)
    image_shape = stream_image_shape(stream)
    check_target(cfg, image_shape)
    torch.manual_seed(cfg.seed)
    stats = target_stats(cfg, stream)
    model = build_run_model(cfg, image_shape, stats, total_steps=cfg.schedule.epochs * batches)
    if cfg.init_from:
        init_encoder(model.encoder, cfg.init_from, cfg.model.encoder, image_shape, CLASSES)
    add_adapters(model.encoder, cfg.model.lora, cfg.model.encoder.name)
    check_engine_settings(cfg, model, info.world, device)
    adabn.check_run_step(cfg, model)
    init_distributed(info, device)
    stop_if_preempted(info, device)
    dist.barrier()   # every rank has checked the run directory before rank 0 creates it
    if info.is_main:
        artifacts.create(run_dir, cfg, stream)
        if simulated_eval:
            prepare_eval_set(cfg)
        prepare_target_eval_set(cfg)
    dist.barrier()
    manifest, _ = load_dataset(cfg)
    check_target(cfg, image_shape)
    writer = None
    with artifacts.run_log(run_dir if info.is_main else None):
        try:
            if cfg.init_from:
                log.info("encoder initialised from %s", cfg.init_from)
            if info.world > 1 and device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)   # (SyncBatchNorm has no CPU kernel)
            total_steps = cfg.schedule.epochs * batches // cfg.deepspeed.grad_accum
            evaluation = Evaluation(cfg, manifest, info, device, DTYPES[resolve_precision(cfg, device)], run_dir)
            start_heads(model.to(device), evaluation)
            engine, precision, _ = make_engine(model, cfg, info.world, device, total_steps)
            if info.is_main:
                from torch.utils.tensorboard import SummaryWriter
                writer = evaluation.writer = SummaryWriter(str(run_dir / "tb"))
            evaluation.target = target_evaluation(evaluation)
            trainer = Trainer(cfg, info, engine, stream, batches, DTYPES[precision], evaluation, on_evaluation, stats,
                              drill)
            if resume:
                trainer.resume()
            log.info("stage %s, tasks %s, %s encoder (%.2fM parameters), %d rank(s) on %s, %s, ZeRO %d, loss "
                     "weighting %s; %d epochs x %d batches of %d per rank", cfg.stage, "+".join(trainer.tasks),
                     cfg.model.encoder.name, sum(p.numel() for p in model.parameters()) / 1e6, info.world, device,
                     precision, cfg.deepspeed.zero_stage, cfg.loss.method, cfg.schedule.epochs, batches,
                     cfg.data.batch_size)
            trainer.train()
            metrics = trainer.finish(image_shape)
            if cfg.data.target.adabn:
                metrics.update(adabn.run_step(cfg, evaluation, info, device, metrics["step"]))
            return metrics
        finally:
            if writer is not None:
                writer.close()


def resolved(cfg: Config, device: torch.device, simulated_eval: bool) -> Config:
    """The config this run records in config.yaml and trains with, a deep copy (the run resolves its engine settings
    in it, `deepspeed.precision=auto` among them: a caller that runs, records or compares its config in the same
    process keeps it as it gave it): transforms resolved for the device, and the evaluation sets a simulated source
    makes in the run directory (RUN/eval_data, RUN/target_eval_data) as its data directories."""
    cfg = resolve_transforms(copy.deepcopy(cfg), device)
    run_dir = Path(cfg.run_dir)
    if simulated_eval:
        cfg = dataclasses.replace(cfg, data_dir=str(run_dir / EVAL_DATA))
    if simulated_target_set(cfg):
        target = dataclasses.replace(cfg.data.target, data_dir=str(run_dir / TARGET_EVAL_DATA))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, target=target))
    return cfg


def start_heads(model: torch.nn.Module, evaluation: Evaluation) -> None:
    """Fit the heads that start from a fit (LP-FT) before the engine exists; a resumed run's checkpoint then
    replaces them, so a fresh and a resumed run go through the same steps."""
    fitted = initialize_heads(model, evaluation)
    if fitted:
        log.info("heads fitted before training on %d images of the train split: %s",
                 max(int(v) for k, v in fitted.items() if k.endswith("/samples")),
                 ", ".join(f"{k}={v:.4g}" for k, v in fitted.items()))


def stop_if_preempted(info: DistInfo, device: torch.device) -> None:
    """Before anything is written: a stop signal received during the set-up, or by an earlier run of this process
    (a transfer plan, the quickstart), stops the run on every rank."""
    signum = preemption.agree(info.world, device)
    if signum:
        message = (f"{preemption.signal_name(signum)} received before training started: nothing was written; "
                   f"exiting with code {preemption.PREEMPTED_EXIT_CODE}")
        if info.is_main:
            log.warning("%s", message)
        raise preemption.Preempted(message, signum)
