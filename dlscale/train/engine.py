"""One `run(config)` for every way of launching a training stage (DESIGN.md section 7).

    dlscale train --stage supervised --data shards/ --run-dir runs/resnet18               # one process
    torchrun --standalone --nproc_per_node 8 launch/train.py --stage multitask ...        # one node, 8 GPUs
    deepspeed --hostfile launch/hostfile launch/train.py --stage multitask ...            # several nodes
    sbatch launch/slurm.sbatch                                                            # SLURM (srun)
    dlscale.train.run(config)                                                             # Ray Tune trials

Streams come from `dlscale.data.stream`; every rank gets the same number of batches per epoch. Checkpoints are
DeepSpeed tags (all ranks save/load) with a small client state; `resume=True` continues from the latest complete
one, skipping the batches of the interrupted epoch that were already trained on, so a resumed run ends with the
same parameters as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from dlscale.config import Config, flatten, save_config, to_dict
from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.data.stream import ShardSet, TrainStream, batches_per_epoch, eval_loader, make_loader
from dlscale.dist import DistInfo, dist_info, setup_logging
from dlscale.evaluate import collect, gather, summarize
from dlscale.export import cpu_state_dict, read_encoder_file, save_encoder
from dlscale.models import build_model
from dlscale.report import log_evaluation, metrics_table, save_roc, scalar_items, write_json
from dlscale.train.deepspeed_setup import init_distributed, make_engine, pick_device
from dlscale.train.weighting import DynamicWeightAverage, build_weighting

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
EvaluationCallback = Callable[[int, dict, Path], None]


class NonFiniteLossError(FloatingPointError):
    """A NaN/Inf loss: the run stops, nothing is saved over the last good checkpoint."""


def check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise ValueError(f"run directory {run_dir} exists; pass --resume auto to continue it, or choose a new "
                         "--run-dir")


def check_dataset(cfg: Config, manifest: dict) -> tuple[int, ...]:
    """The manifest must match the model: canonical classes and the encoder's input channels."""
    shape = tuple(manifest["image_shape"])
    if tuple(manifest["classes"]) != CLASSES:
        raise ValueError(f"{cfg.data_dir}: classes {manifest['classes']}, the models use {list(CLASSES)}")
    if shape[0] != cfg.model.encoder.in_channels:
        raise ValueError(f"{cfg.data_dir}: images have {shape[0]} channel(s) {shape}; set "
                         f"--model.encoder.in_channels={shape[0]}")
    if "train" not in manifest["splits"] or cfg.eval.split not in manifest["splits"]:
        raise ValueError(f"{cfg.data_dir}: needs a train split and the eval split {cfg.eval.split!r}; "
                         f"has {', '.join(manifest['splits'])}")
    return shape


def target_stats(cfg: Config) -> dict[str, list[float]] | None:
    """Mean/std of the regression targets over (up to) the first 4096 train samples: the same on every rank."""
    if not cfg.data.targets:
        return None
    shards, values, n = ShardSet(cfg.data_dir, "train", cfg.data), [], 0
    for index in range(len(shards.urls)):
        for _, _, _, targets in shards.records(index):
            values.append(targets.numpy())
            n += len(targets)
        if n >= 4096:
            break
    stacked = np.concatenate(values)
    return {"mean": stacked.mean(0).tolist(), "std": (stacked.std(0) + 1e-8).tolist()}


def resolve_init(cfg: Config, shape: tuple[int, ...]) -> dict | None:
    """The exported encoder `init_from` names, checked against this run's encoder and data."""
    if not cfg.init_from:
        return None
    payload = read_encoder_file(cfg.init_from)
    theirs, ours = payload["encoder_config"], dataclasses.asdict(cfg.model.encoder)
    for key in ("name", "in_channels", "small_input_stem", "width"):
        if theirs.get(key) != ours.get(key):
            raise ValueError(f"init_from {cfg.init_from}: encoder {key}={theirs.get(key)!r}, this run has "
                             f"{ours.get(key)!r}; set --model.encoder.{key}={theirs.get(key)!r}")
    if tuple(payload.get("image_shape", shape)) != shape or tuple(payload.get("classes", CLASSES)) != CLASSES:
        raise ValueError(f"init_from {cfg.init_from}: trained on images {payload.get('image_shape')} / classes "
                         f"{payload.get('classes')}, this data has {list(shape)} / {list(CLASSES)}")
    return payload


def task_losses(out: dict, batch: dict, images: torch.Tensor, stats: dict | None) -> dict[str, torch.Tensor]:
    losses = {}
    if "recon" in out:
        losses["recon"] = F.mse_loss(out["recon"].float(), images.float())
    if "logits" in out:
        losses["classification"] = F.cross_entropy(out["logits"].float(), batch["label"].to(out["logits"].device))
    if "regression" in out:
        mean = torch.tensor(stats["mean"], device=images.device)
        std = torch.tensor(stats["std"], device=images.device)
        target = (batch["target"].to(images.device) - mean) / std
        losses["regression"] = F.mse_loss(out["regression"].float(), target)
    return losses


def git_description() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return rev.stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


class Trainer:
    """Holds the engine, streams and the tiny checkpointed state (epoch, batch in epoch) of one run."""

    def __init__(self, cfg: Config, info: DistInfo, resume: bool, on_evaluation: EvaluationCallback | None = None):
        self.cfg, self.info, self.on_evaluation = cfg, info, on_evaluation
        self.run_dir = Path(cfg.run_dir)
        self.device = pick_device(cfg.device)
        check_run_dir(self.run_dir, resume)
        self.manifest = load_manifest(cfg.data_dir)
        self.image_shape = check_dataset(cfg, self.manifest)
        init_payload = resolve_init(cfg, self.image_shape)
        init_distributed(info, self.device)
        dist.barrier()   # every rank has checked the run directory before rank 0 creates it
        if info.is_main:
            (self.run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "git.txt").write_text(git_description() + "\n")
        setup_logging(info.rank, self.run_dir / "log.txt" if info.is_main else None)
        dist.barrier()

        torch.manual_seed(cfg.seed)
        self.stats = target_stats(cfg)
        model = build_model(cfg.stage, cfg.model.encoder, self.image_shape, len(CLASSES), len(cfg.data.targets),
                            cfg.model.tasks, classifier_dropout=cfg.model.classifier_dropout)
        model.weighting = build_weighting(cfg.loss.method, model.tasks, cfg.loss.weights, cfg.loss.temperature)
        if init_payload is not None:
            model.encoder.load_state_dict(init_payload["state_dict"])
            log.info("encoder initialised from %s", cfg.init_from)
        if info.world > 1 and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)   # (SyncBatchNorm has no CPU kernel)
        self.tasks = model.tasks
        shards = ShardSet(cfg.data_dir, "train", cfg.data)
        self.batches = cfg.schedule.batches_per_epoch or batches_per_epoch(shards.num_samples, cfg.data.batch_size,
                                                                           info.world)
        self.stream = TrainStream(shards, info.rank, info.world, self.batches, cfg.seed)
        total_steps = cfg.schedule.epochs * self.batches // cfg.deepspeed.grad_accum
        self.engine, self.precision, _ = make_engine(model.to(self.device), cfg, info.world,
                                                                  self.device, total_steps)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.epoch, self.batch_in_epoch, self.last_checkpoint = 0, 0, None
        self.sums, self.count = {t: 0.0 for t in self.tasks}, 0   # this epoch's loss sums (DWA needs epoch means)
        self.train_seconds, self.train_samples = 0.0, 0            # throughput of this process's training
        self.writer = None
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        if resume:
            self.load_checkpoint()
        n_params = sum(p.numel() for p in model.parameters())
        log.info("stage %s, tasks %s, %s encoder (%.2fM parameters), %d rank(s) on %s, %s, ZeRO %d; %d epochs x %d "
                 "batches of %d per rank", cfg.stage, "+".join(self.tasks), cfg.model.encoder.name, n_params / 1e6,
                 info.world, self.device, self.precision, cfg.deepspeed.zero_stage, cfg.schedule.epochs,
                 self.batches, cfg.data.batch_size)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.engine.global_steps,
                "epoch_loss_sums": self.sums, "epoch_batches": self.count,
                "seed": self.cfg.seed, "world": self.info.world, "target_stats": self.stats,
                "loss_weights": self.module.weighting.weights}

    def save_checkpoint(self) -> None:
        tag = f"step{self.engine.global_steps:08d}"
        if tag == self.last_checkpoint:
            return
        self.engine.save_checkpoint(str(self.run_dir / CHECKPOINTS), tag=tag, client_state=self.client_state())
        self.last_checkpoint = tag
        dist.barrier()   # every rank has written its part before old tags go
        if self.info.is_main:
            tags = sorted(p for p in (self.run_dir / CHECKPOINTS).glob("step*") if p.is_dir())
            for old in tags[:-max(1, self.cfg.schedule.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> None:
        ckpt = self.run_dir / CHECKPOINTS
        latest = ckpt / "latest"
        if not latest.is_file():
            log.warning("--resume: no complete checkpoint in %s, starting from the beginning", ckpt)
            return
        tag = latest.read_text().strip()
        state_file = next((ckpt / tag).glob("mp_rank_00_model_states.pt"), None)
        if state_file is not None:
            saved = torch.load(state_file, map_location="cpu", weights_only=False).get("world")
            if saved not in (None, self.info.world) and self.cfg.deepspeed.zero_stage > 0:
                raise ValueError(f"checkpoint {ckpt / tag} was written by {saved} ranks with ZeRO stage "
                                 f"{self.cfg.deepspeed.zero_stage}; its optimizer state is partitioned for {saved} "
                                 f"ranks: resume with {saved} ranks (or start a new run with --init_from)")
        path, client = self.engine.load_checkpoint(str(ckpt), tag=tag)
        if path is None:
            raise ValueError(f"could not load checkpoint {ckpt / tag}")
        self.epoch, self.batch_in_epoch = client["epoch"], client["batch_in_epoch"]
        self.sums, self.count = client["epoch_loss_sums"], client["epoch_batches"]
        self.stats = client.get("target_stats", self.stats)
        self.last_checkpoint = tag
        log.info("resumed from %s (epoch %d, batch %d, step %d)", tag, self.epoch, self.batch_in_epoch,
                 client["step"])

    # ---- training --------------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, every = self.cfg, self.cfg.schedule.checkpoint_every
        while self.epoch < cfg.schedule.epochs:
            self.stream.set_epoch(self.epoch)
            skip, save_after_epoch = self.batch_in_epoch, False
            bar = tqdm(total=self.batches, initial=skip, desc=f"{cfg.stage} epoch {self.epoch + 1}/"
                       f"{cfg.schedule.epochs}", unit="batch", disable=not self.info.is_main, leave=False)
            window_start, wait, window_samples = time.perf_counter(), 0.0, 0
            epoch_start, epoch_samples = time.perf_counter(), 0
            loader = iter(make_loader(self.stream, cfg.data))
            for index in range(self.batches):
                fetch_start = time.perf_counter()
                batch = next(loader)
                if index < skip:     # resumed mid-epoch: these batches were trained on before the interruption
                    continue
                wait += time.perf_counter() - fetch_start
                losses, total, weights = self.train_step(batch)
                for task, value in losses.items():
                    self.sums[task] += value
                self.count += 1
                self.batch_in_epoch = index + 1
                window_samples += len(batch["label"]) * self.info.world
                epoch_samples += len(batch["label"]) * self.info.world
                bar.update(1)
                step = self.engine.global_steps
                boundary = self.engine.is_gradient_accumulation_boundary()
                if self.info.is_main and step % cfg.schedule.log_every == 0 and boundary:
                    elapsed = time.perf_counter() - window_start
                    self.log_train(step, total, losses, weights, window_samples / elapsed, wait / elapsed)
                    bar.set_postfix(loss=f"{total:.4f}")
                    window_start, wait, window_samples = time.perf_counter(), 0.0, 0
                if every and step % every == 0 and boundary:
                    if index + 1 < self.batches:
                        self.save_checkpoint()
                    else:                # the epoch's end state (DWA update, epoch counter) belongs in it
                        save_after_epoch = True
            bar.close()
            self.train_seconds += time.perf_counter() - epoch_start
            self.train_samples += epoch_samples
            self.end_epoch()
            if save_after_epoch:
                self.save_checkpoint()

    def train_step(self, batch: dict) -> tuple[dict[str, float], float, dict[str, float]]:
        images = batch["image"].to(self.device, self.dtype, non_blocking=True)
        out = self.engine(images)
        losses = task_losses(out, batch, images, self.stats)
        total, weights = self.module.weighting(losses)
        # One device->host copy per step, before backward is queued: the all-ranks NaN flag and the loss values.
        values = torch.stack([total.detach(), *(v.detach() for v in losses.values())]).float()
        bad = (~torch.isfinite(values).all()).float().reshape(1)   # every rank stops together, none hangs
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        flag, total_value, *loss_values = torch.cat([bad, values]).tolist()
        host_losses = dict(zip(losses, loss_values))
        if flag:
            keys = ShardSet(self.cfg.data_dir, "train", self.cfg.data).describe(batch["ids"][:8])
            raise NonFiniteLossError(
                f"non-finite loss at step {self.engine.global_steps} (epoch {self.epoch}, batch {self.batch_in_epoch}"
                f"): {host_losses} on some rank; this rank's batch starts with {keys}. Nothing was saved; last good "
                f"checkpoint: {self.last_checkpoint}")
        self.engine.backward(total)
        self.engine.step()
        return host_losses, total_value, weights

    def log_train(self, step: int, total: float, losses: dict, weights: dict, samples_per_s: float,
                  wait_fraction: float) -> None:
        w = self.writer
        w.add_scalar("train/loss", total, step)
        for task, value in losses.items():
            w.add_scalar(f"train/loss_{task}", value, step)
            w.add_scalar(f"train/weight_{task}", weights[task], step)
        w.add_scalar("train/lr", self.engine.get_lr()[0], step)
        w.add_scalar("throughput/samples_per_s", samples_per_s, step)
        w.add_scalar("throughput/data_wait_fraction", wait_fraction, step)
        log.info("step %d epoch %d: loss %.4f (%s), %.0f samples/s, %.0f%% waiting for data", step, self.epoch,
                 total, ", ".join(f"{k} {v:.4f} x{weights[k]:.3g}" for k, v in losses.items()), samples_per_s,
                 100 * wait_fraction)

    def end_epoch(self) -> None:
        weighting = self.module.weighting
        if isinstance(weighting, DynamicWeightAverage):
            means = torch.tensor([self.sums[t] / max(self.count, 1) for t in self.tasks], dtype=torch.float64,
                                 device=self.device)
            dist.all_reduce(means)
            weighting.end_epoch({t: float(v) / self.info.world for t, v in zip(self.tasks, means)})
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.sums, self.count = {t: 0.0 for t in self.tasks}, 0
        every = self.cfg.schedule.eval_every_epochs
        if every and self.epoch % every == 0 and self.epoch < self.cfg.schedule.epochs:
            self.save_checkpoint()   # the evaluated state, so a sweep can report and later restore it
            metrics, _ = self.evaluate(probe=False)
            if self.on_evaluation is not None:
                self.on_evaluation(self.epoch, {**metrics, **self.weight_metrics()}, self.run_dir / CHECKPOINTS)

    # ---- evaluation and export -------------------------------------------------------------------------------
    def evaluate(self, split: str | None = None, probe: bool = True) -> tuple[dict, dict]:
        """Metrics on the whole eval split (every sample once across ranks) and, with `probe`, a linear probe."""
        cfg, split = self.cfg, split or self.cfg.eval.split
        return evaluate_split(self.module, cfg, self.manifest, self.info, self.device, self.dtype, split,
                              self.stats, probe, self.writer, self.engine.global_steps)

    def weight_metrics(self) -> dict[str, float]:
        """The effective loss weights now, as metrics `train/weight_<task>` (the same on every rank)."""
        return {f"train/weight_{task}": w for task, w in self.module.weighting.weights.items()}

    def finish(self) -> dict:
        self.save_checkpoint()
        metrics, scores = self.evaluate()
        metrics["throughput/samples_per_s"] = self.train_samples / max(self.train_seconds, 1e-9)
        metrics.update(self.weight_metrics())
        if self.info.is_main:
            write_json(self.run_dir / "metrics.json", {**json.loads((self.run_dir / "metrics.json").read_text()),
                                                       **metrics})
            encoder_cfg = self.cfg.model.encoder
            info = {"classes": list(CLASSES), "image_shape": list(self.image_shape),
                    "normalize": self.cfg.data.normalize, "stage": self.cfg.stage,
                    "targets": list(self.cfg.data.targets), "target_stats": self.stats}
            save_encoder(self.run_dir / "encoder.pt", self.module.encoder, encoder_cfg, info)
            tmp = self.run_dir / "model.pt.tmp"
            torch.save(cpu_state_dict(self.module), tmp)
            os.replace(tmp, self.run_dir / "model.pt")
            write_hparams(self.writer, self.cfg, metrics)
            self.writer.close()
            print(f"\n{self.cfg.stage} finished: {self.run_dir}\n"
                  f"{metrics_table(metrics, CLASSES, self.cfg.eval.split)}\n  encoder          "
                  f"{self.run_dir / 'encoder.pt'}", flush=True)
        if self.on_evaluation is not None:   # last: a sweep scheduler may end the process inside the callback
            self.on_evaluation(self.epoch, metrics, self.run_dir / CHECKPOINTS)
        return metrics


def evaluate_split(model, cfg: Config, manifest: dict, info: DistInfo, device, dtype, split: str,
                   stats: dict | None, probe: bool, writer=None, step: int = 0) -> tuple[dict, dict]:
    """Evaluate `model` on `split` (every sample once across ranks) and, with `probe`, fit the linear probe.

    Every rank returns the same metrics; rank 0 writes metrics.json, scores_<split>.npz, the ROC figure and the
    TensorBoard entries. A failure on rank 0 is shared with the other ranks, so none waits forever.
    """
    scores = gather(collect(model, eval_loader(cfg.data_dir, cfg.data, info.rank, info.world, split), device, dtype))
    train_features = None
    if probe and cfg.eval.probe_samples > 0:
        per_rank = -(-cfg.eval.probe_samples // info.world)
        train_features = gather(collect(model, eval_loader(cfg.data_dir, cfg.data, info.rank, info.world, "train"),
                                        device, dtype, max_samples=per_rank, n_examples=0))
    outcome: list = [None]
    if info.is_main:
        try:
            outcome = [_report_split(cfg, manifest, split, scores, train_features, stats, writer, step)]
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


def _report_split(cfg: Config, manifest: dict, split: str, scores: dict, train_features: dict | None,
                  stats: dict | None, writer, step: int) -> dict:
    run_dir = Path(cfg.run_dir)
    expected = manifest["splits"][split]["samples"]
    if len(scores["labels"]) != expected:
        raise RuntimeError(f"evaluated {len(scores['labels'])} samples of split {split!r}, the manifest has "
                           f"{expected}: the eval stream lost or repeated samples")
    if "regression" in scores:
        scores["regression"] = scores["regression"] * np.array(stats["std"]) + np.array(stats["mean"])
    metrics = summarize(scores, train_features, CLASSES, split, cfg.data.targets, cfg.eval.n_bootstrap, cfg.seed)
    metrics["step"] = step
    old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    write_json(run_dir / "metrics.json", {**old, **metrics})
    np.savez(run_dir / f"scores_{split}.npz", **{k: v for k, v in scores.items() if k != "features"})
    if "probs" in scores:
        save_roc(run_dir / ("roc.png" if split == "val" else f"roc_{split}.png"),
                 {cfg.stage: (scores["probs"], scores["labels"])}, CLASSES)
    if writer is not None:
        log_evaluation(writer, step, metrics, scores, CLASSES, split)
    return metrics


def write_hparams(writer, cfg: Config, metrics: dict) -> None:
    """The run's TensorBoard hparams record (in the writer's own directory): every scalar config value, dotted,
    against the scalar metrics. Sweeps write it for trials stopped before `finish`."""
    hparams = {k: v for k, v in flatten(to_dict(cfg)).items() if isinstance(v, (int, float, str, bool))}
    writer.add_hparams(hparams, {k: v for k, v in scalar_items(metrics).items() if not k.endswith("n_samples")},
                       run_name=".")


def run(cfg: Config, resume: bool = False, local_rank: int | None = None,
        on_evaluation: EvaluationCallback | None = None) -> dict:
    """Train one stage end to end (train, checkpoint, evaluate, export); return the final metrics (every rank).

    `on_evaluation(epoch, metrics, checkpoint_dir)` is called on every rank after each evaluation (Ray Tune
    reports through it). The process group outlives the call (DeepSpeed caches its groups), so runs can follow
    each other in one process.
    """
    cfg.validate()
    info = dist_info(local_rank)
    setup_logging(info.rank)
    trainer = None
    try:
        trainer = Trainer(cfg, info, resume, on_evaluation)
        trainer.train()
        return trainer.finish()
    finally:
        if trainer is not None and trainer.writer is not None:
            trainer.writer.close()


def evaluate_run(run_dir: str | Path, data_dir: str | None = None, split: str = "val",
                 local_rank: int | None = None) -> dict:
    """`dlscale eval`: reload a finished run (config.yaml + model.pt) and evaluate it on `split` of `data_dir`."""
    from dlscale.config import load_config
    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir}: no model.pt; only finished runs can be evaluated")
    cfg = load_config(run_dir / "config.yaml", data_dir=data_dir, run_dir=str(run_dir))   # the run may have moved
    info = dist_info(local_rank)
    setup_logging(info.rank)
    device = pick_device(cfg.device)
    manifest = load_manifest(cfg.data_dir)
    shape = check_dataset(cfg, manifest)
    if split not in manifest["splits"]:
        raise ValueError(f"{cfg.data_dir}: no split {split!r} (has {', '.join(manifest['splits'])})")
    init_distributed(info, device)
    encoder_info = read_encoder_file(run_dir)
    model = build_model(cfg.stage, cfg.model.encoder, shape, len(CLASSES), len(cfg.data.targets), cfg.model.tasks)
    model.weighting = build_weighting(cfg.loss.method, model.tasks, cfg.loss.weights, cfg.loss.temperature)
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    metrics, _ = evaluate_split(model.to(device), cfg, manifest, info, device, torch.float32, split,
                                encoder_info.get("target_stats"), probe=True)
    if info.is_main:
        print(f"{run_dir} on {cfg.data_dir} [{split}]\n{metrics_table(metrics, CLASSES, split)}", flush=True)
    return metrics
