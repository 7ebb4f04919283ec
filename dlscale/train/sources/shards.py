"""`data.source=shards`: the train split of `data_dir` through the resampled shard stream (`TrainStream`)."""
from __future__ import annotations

import numpy as np
import torch

from dlscale.data.shardset import ShardSet
from dlscale.data.stream import TrainStream, batches_per_epoch
from dlscale.train.sources.base import TrainingSource, register_source


@register_source
class ShardSource(TrainingSource):
    name = "shards"
    description = "the dataset in data_dir (its train split), read through the resampled shard stream"
    reads_train_split = True

    def build(self, info, device: torch.device):
        cfg = self.cfg
        shards = ShardSet(cfg.data_dir, "train", cfg.data)
        batches = cfg.schedule.batches_per_epoch or batches_per_epoch(shards.num_samples, cfg.data.batch_size,
                                                                      info.world)
        return TrainStream(shards, info.rank, info.world, batches, cfg.seed), batches

    def describe(self, stream, ids: torch.Tensor) -> list[str]:
        return stream.shards.describe(ids)

    def target_sample(self, stream, n: int) -> np.ndarray:
        """The targets of the first shards of the train split (whole shards, until >= n)."""
        shards, values, held = stream.shards, [], 0
        for shard in range(len(shards.urls)):
            for _, _, _, targets in shards.records(shard):
                values.append(targets.numpy())
                held += len(targets)
            if held >= n:
                break
        return np.concatenate(values)

    def skip_counts(self, stream):
        return stream
