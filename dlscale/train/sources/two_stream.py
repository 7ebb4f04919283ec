"""Two streams in one batch: the labelled training data and the unlabelled images of a target domain (domain
adaptation, stage `adapt`).

The labelled side is the run's own source (`data.source`: shards or simulate); the target side is a source of the
same registry built from `data.target` (its dataset's train split, or the simulator), asked for exactly as many
batches per epoch, so every rank still yields the same number of batches. Each batch is the labelled side's batch
plus `batch[TARGET_DOMAIN]`: the target's `image` and `ids` only. The target's labels are dropped here, so no loss
can read them; its val split scores the run (`target/val/...`, `dlscale.train.evaluation.evaluate_target`).

The target stream has a seed of its own (derived from the run's), so a simulated target never repeats the
labelled side's lens parameters; resuming replays both sides' batches (both are pure functions of seed, epoch and
batch index), and each side counts its own skipped shards (`target_data/skipped_*`).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from dlscale.data.transforms import RAW
from dlscale.models.model import TARGET_DOMAIN   # (a dict: `image`, `ids`, and RAW when data.transforms=device)
from dlscale.train.sources.base import TrainingSource, source_class
from dlscale.train.tasks import task_class

TARGET_EVAL_DATA = "target_eval_data"
"""RUN/target_eval_data: the simulated target's evaluation set, when `data.target.data_dir` names none."""
TARGET_PREFIX = "target/"
"""Metrics of the target domain: `target/val/...`, `target/probe/...`."""
TARGET_SEED_KEY = 0x7A26E7
TARGET_KEYS = ("image", "ids", RAW)
"""What a target batch keeps (never its labels or metadata)."""


def target_seed(seed: int) -> int:
    """The target stream's seed: another stream than the labelled side's, a function of the run's seed."""
    return int(np.random.SeedSequence([seed, TARGET_SEED_KEY]).generate_state(1)[0])


def target_config(cfg):
    """The run's config seen from the target side: its source, dataset and simulator, its own seed and no
    regression targets (a target's metadata need not have them). `TwoStreamSource.build` sets its batches per
    epoch to the labelled side's."""
    target = cfg.data.target
    tcfg = copy.deepcopy(cfg)
    tcfg.data.source, tcfg.data.simulator, tcfg.data.targets = target.source, target.simulator, []
    tcfg.data.target = type(target)()
    tcfg.data_dir = target.data_dir or str(Path(cfg.run_dir) / TARGET_EVAL_DATA)
    tcfg.seed = target_seed(cfg.seed)
    return tcfg


def simulated_target_set(cfg) -> bool:
    """True when the target's evaluation set is simulated into RUN/target_eval_data (a simulated target without
    `data.target.data_dir`, or with that directory, as config.yaml records it)."""
    target = cfg.data.target
    return target.source == "simulate" and (not target.data_dir or
                                            Path(target.data_dir) == Path(cfg.run_dir) / TARGET_EVAL_DATA)


def needs_target(task_names) -> list[str]:
    """The tasks (names) whose loss reads the target domain's images."""
    return [name for name in task_names if TARGET_DOMAIN in task_class(name).batch_keys]


class TwoStream(torch.utils.data.IterableDataset):
    """The pair of streams (`labelled`, `target`) a two-stream source built; `set_epoch` sets both."""

    def __init__(self, labelled, target) -> None:
        self.labelled, self.target = labelled, target

    def set_epoch(self, epoch: int) -> None:
        self.labelled.set_epoch(epoch)
        self.target.set_epoch(epoch)

    def __iter__(self):
        raise TypeError("iterate a two-stream source through its loader (TwoStreamSource.loader)")


class PairedLoader:
    """One epoch of paired batches: the labelled side's batch with the target's image (and ids) under
    TARGET_DOMAIN. Both loaders yield the same number of batches."""

    def __init__(self, labelled, target) -> None:
        self.labelled, self.target = labelled, target

    def __iter__(self):
        for batch, target in zip(self.labelled, self.target, strict=True):
            kept = {k: v for k, v in target.items() if k in TARGET_KEYS}   # no labels
            yield {**batch, TARGET_DOMAIN: kept}


class TwoStreamSource(TrainingSource):
    """The labelled source of `data.source` and the unlabelled target of `data.target` (chosen by
    `training_source` when a task of the run reads the target domain; not selectable as `data.source`)."""
    name = "two_stream"
    description = "the labelled data_dir / simulator plus the unlabelled target domain of data.target"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.labelled = source_class(cfg.data.source)(cfg)
        self.reads_train_split = self.labelled.reads_train_split
        self.needs_data_dir = self.labelled.needs_data_dir
        self.batch_keys = (*self.labelled.batch_keys, TARGET_DOMAIN)
        self.target_cfg = target_config(cfg)
        self.target = source_class(cfg.data.target.source)(self.target_cfg)

    def build(self, info, device: torch.device):
        labelled, batches = self.labelled.open(info, device)
        self.target_cfg.schedule.batches_per_epoch = batches   # as many target batches as labelled ones
        target, _ = self.target.open(info, device)
        if tuple(self.target.image_shape(target)) != tuple(self.labelled.image_shape(labelled)):
            raise ValueError(f"the target domain's images are {list(self.target.image_shape(target))}, the labelled "
                             f"data's {list(self.labelled.image_shape(labelled))} ({describe_data(self.cfg)}): set "
                             "data.resize to bring both to one side")
        return TwoStream(labelled, target), batches

    def image_shape(self, stream) -> tuple[int, ...]:
        return self.labelled.image_shape(stream.labelled)

    def loader(self, stream):
        return PairedLoader(self.labelled.loader(stream.labelled), self.target.loader(stream.target))

    def describe(self, stream, ids: torch.Tensor) -> list[str]:
        return self.labelled.describe(stream.labelled, ids)

    def target_sample(self, stream, n: int) -> np.ndarray:
        return self.labelled.target_sample(stream.labelled, n)

    def skip_counts(self, stream):
        return self.labelled.skip_counts(stream.labelled)

    def record(self, stream) -> dict | None:
        sides = {"labelled": self.labelled.record(stream.labelled), "target": self.target.record(stream.target)}
        return {side: record for side, record in sides.items() if record is not None} or None

    def skip_groups(self, stream) -> dict:
        return {"data": self.skip_counts(stream), "target_data": self.target.skip_counts(stream.target)}

    def simulated_eval_set(self) -> bool:
        return self.labelled.simulated_eval_set()

    def prepare_eval_set(self) -> None:
        self.labelled.prepare_eval_set()


def describe_data(cfg) -> str:
    """`labelled <where>, target <where>` for error messages."""
    labelled = cfg.data_dir or f"simulated {cfg.data.simulator.preset}"
    target = cfg.data.target.data_dir or f"simulated {cfg.data.target.simulator.preset}"
    return f"labelled: {labelled}; target: {target}"
