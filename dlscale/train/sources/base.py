"""The protocol of a training data source and the registry that `data.source` names.

A source turns a run's config into this rank's training stream and answers everything the runner and the trainer
ask about it; nothing outside a source branches on `data.source`. A source is a class with a `name`, registered
with `@register_source` (a test file or a user package can add one, no dlscale edit), instantiated per run with the
run's config:

    source = training_source(cfg)                  # SOURCES[cfg.data.source](cfg)
    stream, batches = source.open(info, device)    # `build`, then the stream remembers its source
    source.image_shape(stream)                     # (C, H, W) of the batches: what the model sees
    source.loader(stream)                          # iterable of one epoch's batches (re-reads `set_epoch`)
    source.describe(stream, ids)                   # readable keys of a batch's samples (error messages)
    source.target_sample(stream, n)                # >= n regression targets, the same on every rank
    source.skip_counts(stream)                     # what `skip_metrics` totals (None: nothing is ever skipped)
    source.skip_groups(stream)                     # {metric prefix: skip counts} of every stream it reads
    source.record(stream)                          # what regenerates a generated stream (RUN/simulation.json)

A stream is an iterable with `set_epoch(epoch)`; each of its batches is a dict with the keys `batch_keys`
(`image` (B, C, H, W), `label` (B,) int64, `ids` (B, 3) int64, `target` (B, T) with `data.targets`) and,
for a batch left raw by `data.transforms=device`, the keys `dlscale.data.transforms.finish_batch` reads.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dlscale.data.stream import make_loader
from dlscale.registry import Registry

SOURCES: Registry["TrainingSource"] = Registry("data source")
"""`data.source` -> the `TrainingSource` class (registration order)."""


def register_source(cls: type["TrainingSource"]) -> type["TrainingSource"]:
    """Class decorator: make `cls` selectable as `data.source=<cls.name>`."""
    if not (isinstance(cls, type) and issubclass(cls, TrainingSource)):
        raise ValueError(f"{cls!r}: a data source subclasses dlscale.train.sources.TrainingSource")
    return SOURCES.register(cls)


def source_class(name: str) -> type["TrainingSource"]:
    """The registered source `name`; raises naming the known ones."""
    return SOURCES.get_class(name)


class TrainingSource:
    """Where a run's training batches come from. Subclasses set `name` (and `description`) and implement `build`;
    the other methods have defaults that fit a stream with `image_shape` and `sample_keys(ids)` attributes (and no
    regression targets)."""

    name: str = ""
    description: str = ""
    """One line for help texts."""
    batch_keys: tuple[str, ...] = ("image", "label", "ids")
    """Keys of every batch (plus `target` when `data.targets` is set)."""
    reads_train_split: bool = False
    """Training reads the train split of `data_dir` (the dataset check then requires one)."""
    needs_data_dir: bool = True
    """A run needs `data_dir` (for training, or for evaluation unless the source simulates its own eval set)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    # ---- to implement -------------------------------------------------------------------------------------------
    def build(self, info, device: torch.device) -> tuple[Any, int]:
        """(this rank's training stream, batches per epoch): every rank must yield the same number of batches."""
        raise NotImplementedError

    # ---- defaults -----------------------------------------------------------------------------------------------
    def check_config(self) -> None:
        """What the config alone decides about this source, raising naming the key (run by `Config.validate`)."""

    def check_inputs(self) -> None:
        """What a run of this source needs given beyond valid values (run by `Config.check_inputs`; a printed
        template may lack it): by default its dataset."""
        if self.needs_data_dir and not self.cfg.data_dir:
            raise ValueError(f"data.source={self.name} needs the dataset: --data DIR (data_dir)")

    def open(self, info, device: torch.device) -> tuple[Any, int]:
        """`build`, recording this source on the stream (so the trainer finds it from the stream alone)."""
        stream, batches = self.build(info, device)
        stream.data_source = self
        return stream, batches

    def image_shape(self, stream) -> tuple[int, ...]:
        """(C, H, W) of the stream's batches, after `data.resize`."""
        return tuple(stream.image_shape)

    def loader(self, stream):
        """One epoch's batches: a DataLoader over a stream that batches itself (a new one re-reads `set_epoch`)."""
        return make_loader(stream, self.cfg.data)

    def describe(self, stream, ids: torch.Tensor) -> list[str]:
        """Readable keys of the samples `ids` of one of the stream's batches."""
        return stream.sample_keys(ids)

    def target_sample(self, stream, n: int) -> np.ndarray:
        """(>= n, T) regression targets from the start of the source's data, THE SAME ON EVERY RANK (the sample
        of `target_stats`, which every rank's heads standardise with). Only called with `data.targets` set."""
        raise ValueError(f"data.source={self.name} provides no regression targets (data.targets)")

    def skip_counts(self, stream):
        """What `dlscale.train.skipped.skip_metrics` totals (an object with a `skips` SkipCounter and `shards`),
        or None for a source that never skips data."""
        return None

    def record(self, stream) -> dict | None:
        """What regenerates the stream's batches bit for bit, for RUN/simulation.json (None: the data on disk is
        the record)."""
        return None

    def skip_groups(self, stream) -> dict:
        """{metric prefix: `skip_counts`} of every stream the source reads (`data/skipped_*`, ...)."""
        return {"data": self.skip_counts(stream)}

    def simulated_eval_set(self) -> bool:
        """True when the run evaluates on a set the source makes itself into RUN/eval_data (no `data_dir`)."""
        return False

    def prepare_eval_set(self) -> None:
        """Rank 0, when `simulated_eval_set()`: write (or reuse) that set in `cfg.data_dir`."""
        raise NotImplementedError(f"data.source={self.name} makes no evaluation set")


class InMemorySource(TrainingSource):
    """The source of `InMemoryStream` (benchmarks and tests of the training step); not selectable by name."""
    name = "in_memory"
    description = "batches already in memory, the same every epoch (built by code, not by config)"

    def __init__(self, cfg=None) -> None:
        super().__init__(cfg)

    def build(self, info, device):
        raise ValueError("an in-memory stream is built by code: InMemoryStream(batches)")

    def loader(self, stream):
        return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())
