"""The training loop of one stage (`Trainer`), over a DeepSpeed engine and a stream built by `dlscale.train.run`.

Every rank gets the same number of batches per epoch. The trainer's checkpointed state is tiny (epoch, batch in
epoch, this epoch's loss sums; with `optim.ema`, the weight average); `--resume auto` continues from the latest
complete checkpoint, skipping the batches of the interrupted epoch already trained on, so a resumed run ends with
the parameters of an uninterrupted one. The engine knows no task and no weighting by name: the model computes the
task losses, the weighting combines them and back-propagates through its hook.

No host synchronisation inside a step: the losses and the non-finite flag stay on the device (`StepWindow`) and are
read once per logging interval, before every checkpoint and at the end of an epoch (`sync`). There the ranks agree,
in one all-reduce, on whether any rank saw a non-finite loss (the run stops on every rank, naming the step and the
batch, before anything is saved) and on a stop signal (`dlscale.preemption`, installed by `run`): every rank then
writes a complete checkpoint of that step and raises `Preempted` (`stop_preempted`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dlscale import preemption
from dlscale.data.transforms import finish_batch
from dlscale.distributed import DistInfo
from dlscale.models.adapters import merged
from dlscale.train import artifacts, checkpoint
from dlscale.train.config import Config
from dlscale.train.data import describe_ids, epoch_loader, training_skip_groups
from dlscale.train.evaluation import (Evaluation, evaluate_with_target, finalize_heads, head_fit_features,
                                      probe_features, rank0_buffers, share_buffers, write_hparams)
from dlscale.train.precise_bn import precise_batchnorm
from dlscale.train.skipped import skip_metrics
from dlscale.train.weight_average import WeightAverage

log = logging.getLogger(__name__)
EvaluationCallback = Callable[[int, dict, Path], None]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(FloatingPointError):
    """A NaN/Inf loss: the run stops, nothing is saved over the last good checkpoint."""


class StepWindow:
    """The steps since the last host read, on the training device: sums of [total, task losses...], the first step
    whose losses were not finite (-1: none), and per step the optimizer step count before it and the batch's first
    sample ids (host tensors, to name a bad batch)."""

    def __init__(self, n_values: int, device: torch.device) -> None:
        self.sums = torch.zeros(n_values, dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.steps: list[int] = []
        self.ids: list[torch.Tensor] = []

    def add(self, values: torch.Tensor, step: int, ids: torch.Tensor) -> None:
        bad = ~torch.isfinite(values).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), len(self.steps), self.first_bad)
        self.sums += values.double()
        self.steps.append(step)
        self.ids.append(ids[:8])


def channels_last(images: torch.Tensor) -> torch.Tensor:
    """A copy of (N, C, H, W) `images` with NHWC strides, which convolutions follow. The strides are explicit: with
    one channel `contiguous(memory_format=torch.channels_last)` keeps the NCHW ones (both count as contiguous)."""
    n, c, h, w = images.shape
    return torch.empty_strided(images.shape, (h * w * c, 1, w * c, c), dtype=images.dtype,
                               device=images.device).copy_(images)


class Trainer:
    """Runs the epochs of one stage over a built DeepSpeed `engine` and training `stream`."""

    def __init__(self, cfg: Config, info: DistInfo, engine, stream, batches: int, dtype: torch.dtype = torch.float32,
                 evaluation: Evaluation | None = None, on_evaluation: EvaluationCallback | None = None,
                 stats: dict | None = None, drill: preemption.Drill | None = None) -> None:
        self.cfg, self.info, self.engine, self.stream, self.batches = cfg, info, engine, stream, batches
        self.dtype, self.evaluation, self.on_evaluation, self.stats = dtype, evaluation, on_evaluation, stats
        self.device = next(engine.module.parameters()).device
        self.run_dir = Path(cfg.run_dir)
        self.tasks = self.module.tasks
        self.epoch, self.batch_in_epoch, self.last_checkpoint = 0, 0, None
        self.samples_seen = 0   # over all ranks, since the start of the run: the data position across world sizes
        self.epoch_sums = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)   # epoch-end hook
        self.count = 0                                              # batches in those sums
        self.window = StepWindow(1 + len(self.tasks), self.device)
        self.weights: dict = {}                                     # the last step's loss weights (maybe tensors)
        self.agreed_stop = 0                                        # the stop signal the ranks agreed on (0: none)
        self.train_seconds, self.train_samples = 0.0, 0            # throughput of this process's training
        self.drill = drill                                          # DLSCALE_SIGNAL_AT_STEP: a signal at a step
        self.ema = WeightAverage(self.module, cfg.optim.ema) if cfg.optim.ema else None   # from the start weights

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def writer(self):
        return self.evaluation.writer if self.evaluation is not None else None

    @property
    def sums(self) -> dict[str, float]:
        """This epoch's loss sums per task (a host read)."""
        return dict(zip(self.tasks, self.epoch_sums.tolist()))

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.engine.global_steps,
                "epoch_loss_sums": self.sums, "epoch_batches": self.count, "seed": self.cfg.seed,
                "world": self.info.world, "target_stats": self.stats, "loss_weights": self.module.weighting.weights,
                "batch_size": self.cfg.data.batch_size, "samples_seen": self.samples_seen,
                "samples_in_epoch": self.batch_in_epoch * self.cfg.data.batch_size * self.info.world,
                "weight_average": self.ema.state_dict() if self.ema is not None else None}

    def save_checkpoint(self) -> None:
        if checkpoint.tag_for(self.engine.global_steps) == self.last_checkpoint:
            return
        self.sync()   # a non-finite loss since the last read stops the run here, before anything is saved
        self.last_checkpoint = checkpoint.save(self.engine, self.run_dir / checkpoint.CHECKPOINTS, self.state_dict(),
                                               self.cfg.schedule.keep_checkpoints, self.info.is_main)

    def resume(self) -> None:
        loaded = checkpoint.load(self.engine, self.run_dir / checkpoint.CHECKPOINTS, self.info.world,
                                 self.info.is_main)
        if loaded is None:
            return
        self.last_checkpoint, client, saved_world = loaded
        at = checkpoint.position(client, self.info.world, self.info.rank, self.cfg.data.batch_size, self.batches,
                                 self.cfg.deepspeed.grad_accum)
        if at.converted:   # the engine counted the old layout's steps: move it to this layout's schedule
            checkpoint.set_step(self.engine, at.step, at.epoch * self.batches + at.batch_in_epoch)
        self.epoch, self.batch_in_epoch, self.samples_seen = at.epoch, at.batch_in_epoch, at.samples_seen
        self.epoch_sums = torch.tensor([at.sums[t] for t in self.tasks], dtype=torch.float64, device=self.device)
        self.count = at.count
        if self.ema is not None:
            if client.get("weight_average") is None:
                raise ValueError(f"optim.ema={self.cfg.optim.ema}: checkpoint {self.last_checkpoint} was written "
                                 "without a weight average (optim.ema=0); resume with the config it was written with")
            self.ema.load_state_dict(client["weight_average"])
        log.info("resumed from %s (epoch %d, batch %d, step %d)%s", self.last_checkpoint, self.epoch,
                 self.batch_in_epoch, at.step, f", written by {saved_world} rank(s) at their step {client['step']}; "
                 f"{at.samples_seen} samples seen, learning rate {self.engine.get_lr()[0]:.6g}" if at.converted else "")
        if at.converted:   # its name counts the old layout's steps: this layout's tag of that step is still to write
            self.last_checkpoint += f" ({saved_world} rank(s))"

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
            loader = iter(epoch_loader(self.stream, cfg))
            for index in range(self.batches):
                fetch_start = time.perf_counter()
                batch = next(loader)
                if index < skip:     # resumed mid-epoch: these batches were trained on before the interruption
                    continue
                wait += time.perf_counter() - fetch_start
                self.train_step(batch)
                self.count, self.batch_in_epoch = self.count + 1, index + 1
                samples = len(batch["label"]) * self.info.world
                self.samples_seen += samples
                window_samples, epoch_samples = window_samples + samples, epoch_samples + samples
                bar.update(1)
                # (the engine's is_gradient_accumulation_boundary() speaks of the next micro-batch once step() ran)
                step = self.engine.global_steps
                boundary = self.engine.micro_steps % self.engine.gradient_accumulation_steps() == 0
                if not boundary:      # a checkpoint, a log line and a stop hold whole optimizer steps
                    continue
                if self.ema is not None:
                    self.ema.update()
                if self.drill is not None and step == self.drill.step:
                    preemption.run_drill(self.drill, step, self.info.rank)
                    self.drill = None
                if step % cfg.schedule.log_every == 0:
                    means = self.sync()
                    if self.info.is_main:
                        elapsed = time.perf_counter() - window_start
                        self.log_train(step, means, window_samples / elapsed, wait / elapsed)
                        bar.set_postfix(loss=f"{means['total']:.4f}")
                    window_start, wait, window_samples = time.perf_counter(), 0.0, 0
                if every and step % every == 0:
                    if index + 1 < self.batches:
                        self.save_checkpoint()
                    else:                # the epoch's end state (epoch hook, epoch counter) belongs in it
                        save_after_epoch = True
                if self.agreed_stop:
                    break
            self.sync()   # the epoch's last steps (and the stop, if one came since)
            stop = self.agreed_stop
            bar.close()
            self.train_seconds += time.perf_counter() - epoch_start
            self.train_samples += epoch_samples
            if stop and self.batch_in_epoch < self.batches:
                self.stop_preempted(stop)
            self.end_epoch()   # (stopped at an epoch's last batch: the epoch is closed first, as without the stop)
            if save_after_epoch:
                self.save_checkpoint()
            if stop:
                self.stop_preempted(stop)

    def sync(self) -> dict[str, float]:
        """The one host read of the steps since the last: the ranks agree (one MAX all-reduce) on the first step
        any of them saw a non-finite loss at, and on a stop signal any of them received (kept in `agreed_stop`).
        Returns this rank's mean losses over those steps (`total` and per task); raises `NonFiniteLossError` on
        every rank. Every rank calls it at the same points."""
        window, self.window = self.window, StepWindow(1 + len(self.tasks), self.device)
        never = len(window.steps)   # the first bad step, negated for MAX: -never when no rank saw one
        first = torch.where(window.first_bad < 0, never, window.first_bad)
        flags = torch.stack([torch.tensor(float(preemption.requested()), dtype=torch.float64, device=self.device),
                             -first.double()])
        if self.info.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, neg_first, *sums = torch.cat([flags, window.sums]).tolist()
        self.agreed_stop = self.agreed_stop or int(signum)
        preemption.adopt(self.agreed_stop)
        if -neg_first < never:
            self.raise_non_finite(window, int(-neg_first))
        n = max(len(window.steps), 1)
        return dict(zip(("total", *self.tasks), (v / n for v in sums)))

    def raise_non_finite(self, window: StepWindow, k: int) -> None:
        keys = describe_ids(self.stream, window.ids[k], self.cfg)
        raise NonFiniteLossError(
            f"non-finite loss at step {window.steps[k]} (epoch {self.epoch}) on some rank; this rank's batch of that "
            f"step starts with {keys}. Nothing was saved; last good checkpoint: {self.last_checkpoint}")

    def stop_preempted(self, signum: int) -> None:
        """Write the checkpoint of this step on every rank, say which signal stopped the run where and how to resume,
        and raise `Preempted` (the entry points exit with `PREEMPTED_EXIT_CODE`)."""
        self.save_checkpoint()
        dist.barrier()   # until rank 0 has marked the tag complete: a rank exiting before makes launchers stop the rest
        name, ckpt_dir = preemption.signal_name(signum), self.run_dir / checkpoint.CHECKPOINTS
        message = (f"{name} received: stopped after step {self.engine.global_steps} (epoch {self.epoch}, batch "
                   f"{self.batch_in_epoch}); checkpoint {ckpt_dir / checkpoint.tag_for(self.engine.global_steps)} "
                   f"is complete; exiting with code {preemption.PREEMPTED_EXIT_CODE}. To continue, run the same "
                   f"command with --resume auto (one process: dlscale train --config {self.run_dir / 'config.yaml'} "
                   "--resume auto)")
        if self.info.is_main:
            log.warning("%s", message)
        raise preemption.Preempted(message, signum)

    def train_step(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One (micro-)step without a host synchronisation: the loss values go into the window on the device."""
        batch = finish_batch(batch, self.cfg.data, self.device, self.dtype)
        images = batch["image"]
        if self.cfg.train.channels_last:
            images = channels_last(images)
        out = self.engine(images, batch)
        losses = self.module.losses(out, images, batch)
        total, self.weights = self.module.weighting(losses)
        values = torch.stack([total.detach(), *(v.detach() for v in losses.values())]).float()
        self.window.add(values, self.engine.global_steps, batch["ids"])
        self.epoch_sums += values[1:].double()
        self.module.weighting.backward(self.engine, losses, total, images, batch)
        self.engine.step()
        return losses, total

    def log_train(self, step: int, means: dict[str, float], samples_per_s: float, wait_fraction: float) -> None:
        """TensorBoard scalars and a log line: the mean losses since the last line, the last step's weights."""
        weights = {task: float(w) for task, w in self.weights.items()}
        losses = {task: means[task] for task in self.tasks}
        w = self.writer
        if w is not None:
            w.add_scalar("train/loss", means["total"], step)
            for task, value in losses.items():
                w.add_scalar(f"train/loss_{task}", value, step)
                w.add_scalar(f"train/weight_{task}", weights[task], step)
            w.add_scalar("train/lr", self.engine.get_lr()[0], step)
            w.add_scalar("throughput/samples_per_s", samples_per_s, step)
            w.add_scalar("throughput/data_wait_fraction", wait_fraction, step)
        log.info("step %d epoch %d: loss %.4f (%s), %.0f samples/s, %.0f%% waiting for data", step, self.epoch,
                 means["total"], ", ".join(f"{k} {v:.4f} x{weights[k]:.3g}" for k, v in losses.items()),
                 samples_per_s, 100 * wait_fraction)

    def end_epoch(self) -> None:
        means = self.epoch_sums / max(self.count, 1)
        dist.all_reduce(means)
        self.module.weighting.end_epoch({t: v / self.info.world for t, v in zip(self.tasks, means.tolist())})
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.epoch_sums, self.count = torch.zeros_like(self.epoch_sums), 0
        every = self.cfg.schedule.eval_every_epochs
        if every and self.epoch % every == 0 and self.epoch < self.cfg.schedule.epochs:
            self.save_checkpoint()   # the evaluated state, so a sweep can report and later restore it
            with rank0_buffers(self.module, self.info.world):
                metrics = evaluate_with_target(self.module, self.evaluation, self.cfg.eval.split, probe=False,
                                               step=self.engine.global_steps)
            if self.on_evaluation is not None:
                self.on_evaluation(self.epoch, {**metrics, **self.weight_metrics()},
                                   self.run_dir / checkpoint.CHECKPOINTS)

    def weight_metrics(self) -> dict[str, float]:
        """The effective loss weights now, as metrics `train/weight_<task>` (the same on every rank)."""
        return {f"train/weight_{task}": w for task, w in self.module.weighting.weights.items()}

    def export(self, image_shape: tuple[int, ...]) -> None:
        """model.pt and encoder.pt (rank 0), LoRA adapters merged into their layers' weights."""
        if self.info.is_main:
            module = merged(self.module)
            artifacts.save_model(self.run_dir, module)
            artifacts.export_encoder(self.run_dir, module, self.cfg, image_shape, self.stats,
                                     self.evaluation.manifest)

    def finish(self, image_shape: tuple[int, ...]) -> dict:
        """Checkpoint, fit the heads to eval-mode features (`Task.finalize`), export model.pt / encoder.pt, then
        evaluate (with the probe, on the same train features) and write the hparams. A stop
        signal received since the last step stops the run before the export (a resumed run exports and evaluates);
        one received later lets the run finish."""
        self.save_checkpoint()
        self.sync()
        if self.agreed_stop:
            self.stop_preempted(self.agreed_stop)
        extra = {}   # before anything can fail
        for prefix, skips in training_skip_groups(self.stream, self.cfg).items():
            extra.update(skip_metrics(skips, prefix, "training" if prefix == "data" else prefix, self.device))
        exported = False
        if self.ema is not None:   # the averaged weights are the run's from here on (their BatchNorm statistics next)
            self.ema.copy_to_model()
        extra.update(precise_batchnorm(self.module, self.cfg, image_shape, self.device))   # the same on every rank
        share_buffers(self.module, self.info.world)   # every rank evaluates the model it exports
        try:
            probe_train = probe_features(self.module, self.evaluation)
            extra.update(finalize_heads(self.module, self.evaluation,   # before the export
                                        head_fit_features(self.module, self.evaluation, probe_train[0])))
            self.export(image_shape)
            exported = True
            metrics = evaluate_with_target(self.module, self.evaluation, self.cfg.eval.split, probe=True,
                                           step=self.engine.global_steps, probe_train=probe_train)
        except Exception:
            if not exported:
                self.export(image_shape)
            log.error("training finished, the evaluation failed: the trained model is in %s (model.pt, encoder.pt); "
                      "`dlscale eval --run-dir %s` evaluates it again", self.run_dir, self.run_dir)
            raise
        metrics.update(extra)
        metrics["throughput/samples_per_s"] = self.train_samples / max(self.train_seconds, 1e-9)
        metrics.update(self.weight_metrics())
        if self.info.is_main:
            metrics = artifacts.update_metrics(self.run_dir / artifacts.METRICS, metrics)
            write_hparams(self.writer, self.cfg, metrics)
        if self.on_evaluation is not None:   # last: a sweep scheduler may end the process inside the callback
            self.on_evaluation(self.epoch, metrics, self.run_dir / checkpoint.CHECKPOINTS)
        return metrics
