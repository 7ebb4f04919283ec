"""Where a run's training batches come from, and the checks that the data fits the model.

Today's source is the shard dataset of `data_dir` (`dlscale.data.stream`); the stream and its batch count are all
the trainer sees of it.
"""
from __future__ import annotations

import numpy as np

from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.data.stream import ShardSet, TrainStream, batches_per_epoch
from dlscale.dist import DistInfo


def check_dataset(cfg, manifest: dict) -> tuple[int, ...]:
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


def target_stats(cfg) -> dict[str, list[float]] | None:
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


def load_dataset(cfg) -> tuple[dict, tuple[int, ...]]:
    """(manifest, image shape) of the run's dataset, checked against the model."""
    manifest = load_manifest(cfg.data_dir)
    return manifest, check_dataset(cfg, manifest)


def train_stream(cfg, info: DistInfo) -> tuple[TrainStream, int]:
    """The training stream of this rank and its batches per epoch."""
    shards = ShardSet(cfg.data_dir, "train", cfg.data)
    batches = cfg.schedule.batches_per_epoch or batches_per_epoch(shards.num_samples, cfg.data.batch_size,
                                                                  info.world)
    return TrainStream(shards, info.rank, info.world, batches, cfg.seed), batches


def describe_ids(cfg, ids) -> list[str]:
    """Readable keys of the samples `ids` of a training batch (for error messages)."""
    return ShardSet(cfg.data_dir, "train", cfg.data).describe(ids)
