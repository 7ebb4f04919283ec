"""Where a run's training batches come from, and the checks that the data fits the model.

The sources themselves are registered parts (`dlscale.train.sources`, keyed by `data.source`: `shards`, the
dataset of `data_dir` through the resampled shard stream; `simulate`, fresh simulated lenses every step, evaluated
on `data_dir` if given or else on a fixed set simulated once into RUN/eval_data; any source registered with
`register_source`). This module holds what is not source-specific (the dataset check, the transform placement,
the target statistics) and the runner's and trainer's entry points, which only ask the run's source: the trainer
sees a stream (`set_epoch`, iteration), its batches per epoch, `epoch_loader` and `describe_ids`.
"""
from __future__ import annotations

import dataclasses


import torch

from dlscale.data.shards import load_manifest
from dlscale.distributed import DistInfo
from dlscale.train.preflight import check_dataset
from dlscale.train.sources import InMemorySource, source_class, source_of, training_source
from dlscale.train.sources.two_stream import simulated_target_set, target_config

STATS_SAMPLES = 4096


def load_dataset(cfg) -> tuple[dict, tuple[int, ...]]:
    """(manifest, image shape) of the run's evaluation (and, for `shards`, training) dataset, checked."""
    manifest = load_manifest(cfg.data_dir)
    return manifest, check_dataset(cfg, manifest)


def prepare_target_eval_set(cfg) -> None:
    """Rank 0: make (or reuse) the simulated target's evaluation set in RUN/target_eval_data."""
    if simulated_target_set(cfg) and cfg.data.target.evaluate:
        source_class("simulate")(target_config(cfg)).prepare_eval_set()


def simulated_eval_set(cfg) -> bool:
    """True when the run evaluates on a set its source makes itself (source simulate without `data_dir`)."""
    return training_source(cfg).simulated_eval_set()


def prepare_eval_set(cfg) -> None:
    """Rank 0: make (or reuse) the source's fixed evaluation set in RUN/eval_data."""
    training_source(cfg).prepare_eval_set()


def resolve_transforms(cfg, device: torch.device):
    """`cfg` with `data.transforms=auto` resolved: on the device when training on CUDA (the host only reads and pins
    records), in the DataLoader workers on CPU. Resolved once, before the streams are built, and recorded in
    config.yaml."""
    if cfg.data.transforms != "auto":
        return cfg
    transforms = "device" if device.type == "cuda" else "host"
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, transforms=transforms))


def train_stream(cfg, info: DistInfo, device: torch.device):
    """(this rank's training stream, batches per epoch), built by the run's source (the stream remembers it)."""
    return training_source(cfg).open(info, device)


class InMemoryStream(torch.utils.data.IterableDataset):
    """A training stream over batches already in memory, the same every epoch: what `Trainer` needs of a stream
    (`set_epoch`, iteration, sample keys), for benchmarks and tests of the training step."""
    data_source = InMemorySource()

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)

    def sample_keys(self, ids: torch.Tensor) -> list[str]:
        return [f"in-memory sample {s}:{r}:{p}" for s, r, p in ids.tolist()]


def stream_image_shape(stream, cfg=None) -> tuple[int, ...]:
    """(C, H, W) of the stream's batches (after `data.resize`): what the model sees."""
    return source_of(stream, cfg).image_shape(stream)


def epoch_loader(stream, cfg):
    """The DataLoader of one epoch (a new one re-reads `set_epoch`)."""
    return source_of(stream, cfg).loader(stream)


def describe_ids(stream, ids: torch.Tensor, cfg=None) -> list[str]:
    """Readable keys of the samples `ids` of a training batch (for error messages)."""
    return source_of(stream, cfg).describe(stream, ids)


def training_skips(stream, cfg=None):
    """What `skip_metrics` totals for the training stream (None: its source never skips data)."""
    return source_of(stream, cfg).skip_counts(stream)


def training_skip_groups(stream, cfg=None) -> dict:
    """{metric prefix: skip counts} of every stream of the run's source (`data`, and `target_data` when adapting)."""
    return source_of(stream, cfg).skip_groups(stream)


def target_stats(cfg, stream) -> dict[str, list[float]] | None:
    """Mean/std of the regression targets over (up to) the first 4096 training samples: the same on every rank
    (the first shards of the train split, or the first global batches of epoch 0 of the simulation)."""
    if not cfg.data.targets:
        return None
    stacked = source_of(stream, cfg).target_sample(stream, STATS_SAMPLES)
    return {"mean": stacked.mean(0).tolist(), "std": (stacked.std(0) + 1e-8).tolist()}
