"""AdaBN (Li et al. 2016, "Revisiting batch normalization for practical domain adaptation"): a trained run's
BatchNorm statistics re-estimated on a target domain's unlabelled images, written as a new run directory whose
model, exported encoder and `dlscale predict` use the target's statistics. No training, no label.

    dlscale adapt-bn --run-dir runs/model_ii --target-data shards/model_iii --out runs/model_ii_on_iii

Every BatchNorm that inference reaches is re-estimated, the classifier head's standardisation included (the
encoder's alone leaves the head on source statistics: its argmax then stays on one class). The statistics are
exact, not a running average: layer by layer in forward order, the mean and unbiased variance of the layer's
inputs over every target image (float64 sums), with the layers before it already adapted, so each layer
normalises its inputs exactly as the adapted model in eval mode presents them. Images are read from the target's
train split with the run's evaluation transforms (its normalisation and `data.resize`; no augmentation); their
labels are dropped as they are read.

The new run holds config.yaml (the source run's, pointed at the target dataset: `dlscale eval --run-dir OUT`
scores the target's val split), model.pt, encoder.pt + encoder.safetensors + encoder.json, git.txt and adabn.json
(the source run and its model.pt sha256, the target dataset, split and images used, the layers adapted). Every
check runs before anything is written, and the directory appears whole (built beside OUT, then renamed).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dlscale import io
from dlscale.configtree import dump_yaml
from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.data.stream import eval_loader, leading_shards
from dlscale.data.stream_config import StreamConfig
from dlscale.train import artifacts
from dlscale.train.config import run_tasks
from dlscale.train.deepspeed_setup import pick_device
from dlscale.train.evaluation import evaluate_split, load_run
from dlscale.train.sources.two_stream import simulated_target_set
from dlscale.train.target_head import SOURCE_HEAD, TARGET_HEADS, refit_head
from dlscale.train.target_selftrain import SelfTrainConfig, self_train

log = logging.getLogger(__name__)
PROVENANCE = "adabn.json"
RUN_STEP_DIR = "adabn"
"""RUN/adabn: the adapted run that stage adapt writes as its last step (`data.target.adabn`)."""
RUN_STEP_PREFIX = "adabn/target/"


@dataclass
class AdaBNConfig:
    """One re-estimation of a run's BatchNorm statistics on a target domain."""
    run_dir: Path
    """the finished source run (model.pt + config.yaml + encoder.pt)"""
    target_data: Path
    """the target's shard dataset; its `split` is read, labels dropped"""
    out: Path
    """the new run directory (must not exist, or be empty)"""
    split: str = "train"
    """the target split whose images set the statistics"""
    max_images: int = 0
    """use the split's first N images (0 = all)"""
    resize: int | None = None
    """resize the target's images to this side (default: the run's data.resize)"""
    batch_size: int = 0
    """images per forward pass (0 = the run's data.batch_size); fewer target images than this are refused"""
    num_workers: int = 0
    """DataLoader worker processes reading the target"""
    device: str = "auto"
    """auto | cpu | cuda"""
    head: str = SOURCE_HEAD
    """then refit the classification head to the target's features without target labels
    (`dlscale.train.target_head`): source (as trained) | coral | em; reads as many of the source run's labelled
    train images as target images"""
    self_train: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    """then fine-tune the encoder on the target's pseudo-labels and refit again (`dlscale.train.target_selftrain`):
    the teacher is the refitted head (the trained one with `head` source); skipped where the refit was refused"""

    def __post_init__(self) -> None:
        self.run_dir, self.target_data, self.out = Path(self.run_dir), Path(self.target_data), Path(self.out)
        if self.head not in TARGET_HEADS:
            raise ValueError(f"adapt-bn: head {self.head!r}: expected one of {', '.join(TARGET_HEADS)}")
        if self.max_images < 0 or self.batch_size < 0 or self.num_workers < 0:
            raise ValueError(f"adapt-bn: max_images, batch_size and num_workers must be >= 0 (got {self.max_images}, "
                             f"{self.batch_size}, {self.num_workers})")


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class _Captured(Exception):
    """Raised by the statistics hook once the layer's input is counted: the rest of the forward is not needed."""


@torch.no_grad()
def forward_order(model: nn.Module, images: torch.Tensor) -> list[str]:
    """The BatchNorm layers an inference forward (`model(images)`) reaches, in the order it reaches them."""
    layers, order = batchnorm_layers(model), []
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: order.append(name) if name not in order else None)
             for name, m in layers.items()]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return order


@torch.no_grad()
def input_statistics(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(mean, unbiased variance, element count) per channel of `layer`'s input over every image of `batches`,
    with `model` in eval mode (float64 sums; the forward stops at the layer)."""
    sums: list = []

    def count(module, args):
        x = args[0].double().transpose(0, 1).flatten(1)   # (C, everything else)
        sums.append((x.shape[1], x.sum(1), x.square().sum(1)))
        raise _Captured

    hook = layer.register_forward_pre_hook(count)
    try:
        for images in batches:
            try:
                model(images)
            except _Captured:
                pass
    finally:
        hook.remove()
    n = sum(s[0] for s in sums)
    total, squares = sum(s[1] for s in sums), sum(s[2] for s in sums)
    mean = total / n
    return mean, (squares - n * mean.square()) / max(n - 1, 1), n


@torch.no_grad()
def adapt_statistics(model: nn.Module, batches: list[torch.Tensor], progress: bool = True) -> dict[str, list[str]]:
    """Re-estimate, in place and in forward order, every BatchNorm that `model(images)` reaches on `batches`
    (see the module docstring). Returns the layers `adapted` and those `kept` (never reached: source statistics)."""
    model.eval()
    order = forward_order(model, batches[0])
    layers = batchnorm_layers(model)
    for name in tqdm(order, desc="AdaBN layers", disable=not progress):
        layer = layers[name]
        mean, var, _ = input_statistics(model, layer, batches)
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
        layer.num_batches_tracked.fill_(len(batches))
    return {"adapted": order, "kept": [n for n in layers if n not in order]}


def stream_settings(cfg, ab: AdaBNConfig, batch_size: int) -> StreamConfig:
    """The run's evaluation transforms for the target (its normalisation and resize; no augmentation)."""
    resize = ab.resize if ab.resize is not None else cfg.data.resize
    return StreamConfig(batch_size=batch_size, num_workers=ab.num_workers, normalize=cfg.data.normalize,
                        augment=False, resize=resize, resize_mode=cfg.data.resize_mode, transforms="host")


def check_target(ab: AdaBNConfig, manifest: dict, stream: StreamConfig, image_shape: tuple[int, ...]) -> int:
    """The number of target images used; refuses a target the model cannot take or too small for one batch."""
    if ab.split not in manifest["splits"]:
        raise ValueError(f"{ab.target_data}: no {ab.split!r} split for AdaBN (has {', '.join(manifest['splits'])})")
    stored = tuple(manifest["image_shape"])
    shape = stream.output_shape(stored)
    if tuple(shape) != tuple(image_shape):
        hint = "" if shape[0] != image_shape[0] else " (--resize SIDE brings the target to the model's side)"
        raise ValueError(f"{ab.target_data}: images {list(stored)} become {list(shape)}, the run {ab.run_dir} "
                         f"takes {list(image_shape)}{hint}")
    available = manifest["splits"][ab.split]["samples"]
    used = min(available, ab.max_images) if ab.max_images else available
    if used < stream.batch_size:
        raise ValueError(f"{ab.target_data}: {used} {ab.split} image(s) for AdaBN, fewer than one batch of "
                         f"{stream.batch_size}: BatchNorm statistics from so few images are noise (give more images "
                         "or a smaller --batch-size)")
    return used


def read_images(data_dir: Path, split: str, stream: StreamConfig, used: int,
                device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first `used` images of a split as batches on `device`, and their labels (kept on the host)."""
    shards = load_manifest(data_dir)["splits"][split]["shards"]
    loader = eval_loader(data_dir, stream, split=split, shard_limit=leading_shards(shards, used))
    batches, labels, held = [], [], 0
    for batch in loader:
        images = batch["image"][:used - held]
        batches.append(images.to(device))
        labels.append(batch["label"][:used - held])
        held += len(images)
        if held >= used:
            break
    return batches, labels


def read_target(ab: AdaBNConfig, stream: StreamConfig, used: int, device: torch.device) -> list[torch.Tensor]:
    """The first `used` images of the target split as batches on `device` (labels dropped here)."""
    return read_images(ab.target_data, ab.split, stream, used, device)[0]


def labelled_images(cfg, ab: AdaBNConfig, used: int) -> tuple[Path, int]:
    """Where a head refit reads the source run's labelled images (its dataset's train split) and how many: as
    many as the target's; refused before anything is read if the run has no classification head or no such split."""
    what = f"--head {ab.head}" if ab.head != SOURCE_HEAD else "--self-train-rounds"
    if "classification" not in run_tasks(cfg):
        raise ValueError(f"{what}: the run {ab.run_dir} has no classification head (tasks "
                         f"{'+'.join(run_tasks(cfg))})")
    data_dir = Path(cfg.data_dir)
    if not (data_dir / "manifest.json").is_file():
        raise ValueError(f"{what}: the run's labelled dataset {data_dir} (its config's data_dir) is not a "
                         "shard dataset: the head refit and self-training need its labelled train images")
    splits = load_manifest(data_dir)["splits"]
    if "train" not in splits:
        raise ValueError(f"{what}: {data_dir} has no train split (has {', '.join(splits)})")
    return data_dir, min(used, splits["train"]["samples"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapt_batchnorm(ab: AdaBNConfig, progress: bool = True) -> Path:
    """Write `ab.out`: the run of `ab.run_dir` with every BatchNorm's statistics re-estimated on the target."""
    if ab.out.exists() and (not ab.out.is_dir() or any(ab.out.iterdir())):
        raise ValueError(f"{ab.out} exists: choose a new --out for the adapted run")
    cfg, model, info = load_run(ab.run_dir)
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{ab.run_dir}: the model ({cfg.model.encoder.name} encoder, heads "
                         f"{'+'.join(model.task_specs)}) has no BatchNorm layer: AdaBN has no statistics to adapt")
    manifest = load_manifest(ab.target_data)
    stream = stream_settings(cfg, ab, ab.batch_size or cfg.data.batch_size)
    used = check_target(ab, manifest, stream, tuple(info["image_shape"]))
    refit = ab.head != SOURCE_HEAD or ab.self_train.rounds > 0   # both read the labelled images
    labelled_dir, labelled_count = labelled_images(cfg, ab, used) if refit else (None, 0)
    device = pick_device(ab.device)
    batches = read_target(ab, stream, used, device)
    source_model = copy.deepcopy(model).to(device) if refit else None
    layers_done = adapt_statistics(model.to(device), batches, progress)
    log.info("AdaBN: %d BatchNorm layer(s) re-estimated on %d %s images of %s", len(layers_done["adapted"]), used,
             ab.split, ab.target_data)
    if refit:
        source_stream = dataclasses.replace(stream, resize=cfg.data.resize)
        source_batches, labels = read_images(labelled_dir, "train", source_stream, labelled_count, device)
        layers_done["head"] = refit_head(ab.head, model, source_model, source_batches, torch.cat(labels).numpy(),
                                         batches)
        log.info("AdaBN: classification head refit (%s) on %d labelled and %d target images: %s", ab.head,
                 labelled_count, used, layers_done["head"])
        if ab.self_train.rounds and not layers_done["head"].get("kept", True):
            # measured: teaching with the trained head instead costs the noise shift's best run 0.007-0.035 AUC
            layers_done["self_train"] = {"rounds": [], "skipped": "the head refit was refused, so the target's "
                                                                  "features are not trusted to give pseudo-labels"}
        elif ab.self_train.rounds:
            model, rounds = self_train(ab.head, model, source_batches, torch.cat(labels).numpy(), batches,
                                       ab.self_train, lambda m, b: adapt_statistics(m, b, progress=False), progress)
            layers_done["self_train"] = {"head": ab.head, "rounds": rounds}
            log.info("AdaBN: self-training (%s head): %s", ab.head, rounds)
    new_cfg = dataclasses.replace(cfg, data_dir=str(ab.target_data), run_dir=str(ab.out),
                                  data=dataclasses.replace(cfg.data, resize=stream.resize))
    provenance = {"source_run": str(ab.run_dir.resolve()), "source_model_sha256": sha256(ab.run_dir / "model.pt"),
                  "target_data": str(ab.target_data.resolve()), "target_source": manifest.get("source"),
                  "split": ab.split, "images": used, "resize": stream.resize, **layers_done}
    write_run(ab.out, new_cfg, model.cpu(), info, manifest, provenance)
    return ab.out


def write_run(out: Path, cfg, model: nn.Module, info: dict, manifest: dict, provenance: dict) -> None:
    """The adapted run directory, built beside `out` and renamed into place: it appears whole or not at all."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        io.write_text(tmp / "config.yaml", dump_yaml(cfg))
        io.write_text(tmp / "git.txt", artifacts.git_description() + "\n")
        io.write_json(tmp / PROVENANCE, provenance)
        artifacts.save_model(tmp, model)
        artifacts.export_encoder(tmp, model, cfg, info["image_shape"], info.get("target_stats"), manifest,
                                 extra={"adabn": provenance})
        if out.is_dir():
            out.rmdir()   # empty (checked): the rename below replaces it
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_run_step(cfg, model: nn.Module) -> None:
    """`data.target.adabn`, before a run directory is created: the model has BatchNorm layers (and a classification
    head for `data.target.head`) and the target's train split holds at least one batch."""
    if not cfg.data.target.adabn:
        return
    if not batchnorm_layers(model):
        raise ValueError(f"data.target.adabn=true: the model ({cfg.model.encoder.name} encoder, heads "
                         f"{'+'.join(model.task_specs)}) has no BatchNorm layer, AdaBN has no statistics to adapt "
                         "(stage adapt sets it by default: --data.target.adabn=false)")
    if cfg.data.target.head != SOURCE_HEAD and "classification" not in model.task_specs:
        raise ValueError(f"data.target.head={cfg.data.target.head}: the model has no classification head to refit "
                         f"(heads {'+'.join(model.task_specs)})")
    target = cfg.data.target
    if simulated_target_set(cfg):
        images, where = len(CLASSES) * target.simulator.probe_per_class, "data.target.simulator.probe_per_class x 3"
    else:
        images = load_manifest(target.data_dir)["splits"].get("train", {}).get("samples", 0)
        where = f"{target.data_dir}'s train split"
    if images < cfg.data.batch_size:
        raise ValueError(f"data.target.adabn=true: {images} target image(s) ({where}), fewer than one batch of "
                         f"{cfg.data.batch_size}")


def run_step(cfg, evaluation, info, device: torch.device, step: int) -> dict:
    """Stage adapt's last step (`data.target.adabn`): rank 0 writes RUN/adabn from the finished run (a resumed run
    writes it again: it derives from model.pt alone); every rank then scores it on the target's evaluation split
    (`adabn/target/<split>/...`, merged into RUN/metrics.json at the run's last `step`). A failure on rank 0 is
    shared with every rank."""
    run_dir = Path(cfg.run_dir)
    out = run_dir / RUN_STEP_DIR
    outcome: list = [None]
    if info.is_main:
        try:
            shutil.rmtree(out, ignore_errors=True)
            adapt_batchnorm(AdaBNConfig(run_dir, cfg.data.target.data_dir, out, num_workers=cfg.data.num_workers,
                                        device=cfg.device, head=cfg.data.target.head))
        except Exception as err:
            outcome = [f"AdaBN of {run_dir} failed: {type(err).__name__}: {err}"]
    if info.world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RuntimeError(outcome[0])
    if evaluation.target is None:
        return {}
    _, model, _ = load_run(out)
    scored, _ = evaluate_split(model.to(device), dataclasses.replace(evaluation.target, prefix=RUN_STEP_PREFIX),
                               cfg.eval.split, probe=False, step=step)   # (merged into RUN/metrics.json there)
    return {k: v for k, v in scored.items() if k.startswith(RUN_STEP_PREFIX)}


def adapt_bn_main(argv: list[str] | None = None) -> int:
    """`dlscale adapt-bn`: argv -> AdaBNConfig -> adapt_batchnorm."""
    p = argparse.ArgumentParser(prog="dlscale adapt-bn", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="the finished source run")
    p.add_argument("--target-data", type=Path, required=True, help="the target's shard dataset (labels unused)")
    p.add_argument("--out", type=Path, required=True, help="the new, adapted run directory")
    p.add_argument("--split", default="train")
    p.add_argument("--max-images", type=int, default=0, help="first N images of the split (0 = all)")
    p.add_argument("--resize", type=int, default=None, help="resize target images to this side")
    p.add_argument("--batch-size", type=int, default=0, help="default: the run's data.batch_size")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--head", default=SOURCE_HEAD, help="then refit the classification head to the target's "
                                                       f"features, label-free: {' | '.join(TARGET_HEADS)}")
    p.add_argument("--self-train-rounds", type=int, default=0,
                   help="then rounds of encoder fine-tuning on the target's pseudo-labels, each refitted again")
    p.add_argument("--self-train-steps", type=int, default=SelfTrainConfig.steps, help="optimiser steps per round")
    p.add_argument("--seed", type=int, default=0, help="seeds the self-training")
    a = p.parse_args(argv)
    out = adapt_batchnorm(AdaBNConfig(a.run_dir, a.target_data, a.out, a.split, a.max_images, a.resize,
                                      a.batch_size, a.num_workers, a.device, a.head,
                                      SelfTrainConfig(a.self_train_rounds, a.self_train_steps, seed=a.seed)))
    print(f"wrote {out}")
    return 0
