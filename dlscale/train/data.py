"""Where a run's training batches come from, and the checks that the data fits the model.

Two sources (`data.source`): `shards`, the dataset of `data_dir` through the resampled shard stream; `simulate`,
fresh simulated lenses every step (`dlscale.sim.stream`), evaluated on `data_dir` if given or else on a fixed set
simulated once into RUN/eval_data. The trainer sees only a stream (`set_epoch`, iteration), its batches per epoch
and `epoch_loader`; nothing else in the engine depends on the source.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.data.stream import ShardSet, TrainStream, batches_per_epoch, make_loader
from dlscale.dist import DistInfo

EVAL_DATA = "eval_data"
STATS_SAMPLES = 4096


def check_dataset(cfg, manifest: dict) -> tuple[int, ...]:
    """The manifest must match the model: canonical classes and the encoder's input channels. Returns the image
    shape the model sees (after `data.resize`)."""
    shape = tuple(manifest["image_shape"])
    if tuple(manifest["classes"]) != CLASSES:
        raise ValueError(f"{cfg.data_dir}: classes {manifest['classes']}, the models use {list(CLASSES)}")
    if shape[0] != cfg.model.encoder.in_channels:
        raise ValueError(f"{cfg.data_dir}: images have {shape[0]} channel(s) {shape}; set "
                         f"--model.encoder.in_channels={shape[0]}")
    needs_train = cfg.data.source == "shards" or cfg.eval.probe_samples > 0   # training, or the probe's features
    if (needs_train and "train" not in manifest["splits"]) or cfg.eval.split not in manifest["splits"]:
        raise ValueError(f"{cfg.data_dir}: needs {'a train split and ' if needs_train else ''}the eval split "
                         f"{cfg.eval.split!r}; has {', '.join(manifest['splits'])}")
    calibration = cfg.eval.calibration_split
    if calibration is not None and calibration not in manifest["splits"]:
        raise ValueError(f"{cfg.data_dir}: eval.calibration_split={calibration!r} is not a split of the dataset "
                         f"(has {', '.join(manifest['splits'])})")
    return cfg.data.output_shape(shape)   # the model's input: the stored images after data.resize


def load_dataset(cfg) -> tuple[dict, tuple[int, ...]]:
    """(manifest, image shape) of the run's evaluation (and, for `shards`, training) dataset, checked."""
    manifest = load_manifest(cfg.data_dir)
    return manifest, check_dataset(cfg, manifest)


def simulated_eval_set(cfg) -> bool:
    """True when the run evaluates on a set it simulates itself (source simulate without `data_dir`)."""
    return cfg.data.source == "simulate" and (not cfg.data_dir or Path(cfg.data_dir) == Path(cfg.run_dir) / EVAL_DATA)


def prepare_eval_set(cfg) -> None:
    """Rank 0: simulate (or reuse) the fixed evaluation set in RUN/eval_data."""
    from dlscale.sim.stream import prepare_eval_set as simulate_set
    simulate_set(cfg.data.simulator, cfg.data_dir)


def resolve_transforms(cfg, device: torch.device) -> None:
    """`data.transforms=auto`: on the device when training on CUDA (the host only reads and pins records), in the
    DataLoader workers on CPU. Resolved once, before the streams are built, and recorded in config.yaml."""
    if cfg.data.transforms == "auto":
        cfg.data.transforms = "device" if device.type == "cuda" else "host"


def train_stream(cfg, info: DistInfo, device: torch.device):
    """(this rank's training stream, batches per epoch)."""
    if cfg.data.source == "simulate":
        from dlscale.sim.stream import SimulationStream
        batches = cfg.schedule.batches_per_epoch
        return SimulationStream(cfg.data.simulator, cfg.data, info.rank, info.world, batches, cfg.seed, device), \
            batches
    shards = ShardSet(cfg.data_dir, "train", cfg.data)
    batches = cfg.schedule.batches_per_epoch or batches_per_epoch(shards.num_samples, cfg.data.batch_size,
                                                                  info.world)
    return TrainStream(shards, info.rank, info.world, batches, cfg.seed), batches


class InMemoryStream(torch.utils.data.IterableDataset):
    """A training stream over batches already in memory, the same every epoch: what `Trainer` needs of a stream
    (`set_epoch`, iteration, sample keys), for benchmarks and tests of the training step."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)

    def sample_keys(self, ids: torch.Tensor) -> list[str]:
        return [f"in-memory sample {s}:{r}:{p}" for s, r, p in ids.tolist()]


def stream_image_shape(stream) -> tuple[int, ...]:
    return tuple(stream.image_shape if hasattr(stream, "image_shape") else stream.shards.image_shape)


def epoch_loader(stream, cfg):
    """The DataLoader of one epoch (a new one re-reads `set_epoch`)."""
    if cfg.data.source == "simulate":
        from dlscale.sim.stream import simulation_loader
        return simulation_loader(stream)
    return make_loader(stream, cfg.data)


def describe_ids(stream, ids: torch.Tensor) -> list[str]:
    """Readable keys of the samples `ids` of a training batch (for error messages)."""
    return stream.sample_keys(ids) if hasattr(stream, "sample_keys") else stream.shards.describe(ids)


def target_stats(cfg, stream) -> dict[str, list[float]] | None:
    """Mean/std of the regression targets over (up to) the first 4096 training samples: the same on every rank
    (the first shards of the train split, or the first global batches of epoch 0 of the simulation)."""
    if not cfg.data.targets:
        return None
    values, n = [], 0
    if cfg.data.source == "simulate":
        index = 0
        while n < STATS_SAMPLES:
            values.append(stream.batch(0, index)["target"].cpu().numpy())
            n, index = n + len(values[-1]), index + 1
    else:
        shards = stream.shards
        for shard in range(len(shards.urls)):
            for _, _, _, targets in shards.records(shard):
                values.append(targets.numpy())
                n += len(targets)
            if n >= STATS_SAMPLES:
                break
    stacked = np.concatenate(values)
    return {"mean": stacked.mean(0).tolist(), "std": (stacked.std(0) + 1e-8).tolist()}
