"""Counting the corrupt parts that tolerant shard streams skip: a counter shared by a rank's DataLoader worker
processes, so the run can total and report them once instead of warning on every read."""
from __future__ import annotations

import logging
import multiprocessing

log = logging.getLogger("dlscale.data.stream")   # the streams' own logger: their records read as before


class SkipCounter:
    """Shard reads a tolerant stream cut short at a corrupt part, and the records they lost, per shard, in shared
    memory: a rank's DataLoader workers are processes of their own."""

    def __init__(self, shards: int):
        self.reads = multiprocessing.Array("q", shards + 1)   # [-1]: all shards together
        self.records = multiprocessing.Array("q", shards, lock=False)   # guarded by reads' lock

    def add(self, shard: int, records_lost: int) -> int:
        """Count one read of `shard` cut short, losing `records_lost` records; returns the reads counted before."""
        with self.reads.get_lock():
            before = self.reads[-1]
            self.reads[shard] += 1
            self.reads[-1] += 1
            self.records[shard] += records_lost
        return before

    def totals(self) -> tuple[list[int], list[int]]:
        """(reads cut short, records lost), one entry per shard."""
        with self.reads.get_lock():
            return list(self.reads[:-1]), list(self.records[:])


def count_skip(counter: SkipCounter, shards, index: int, records_read: int, err: Exception, rank: int,
               worker: int) -> None:
    """Count a read of shard `index` of `shards` (a `ShardSet`) cut short after `records_read` records; the first
    skip of a counter is a warning, later ones are debug records (the run logs their totals once)."""
    lost = max(shards.shards[index].get("records", records_read + 1) - records_read, 1)
    before = counter.add(index, lost)
    (log.warning if before == 0 else log.debug)(
        "skipped a corrupt part of %s (%d skipped so far by rank %d worker %d, %d record(s) of it unread): %s%s",
        shards.urls[index], before + 1, rank, worker, lost, err,
        "; further skips are counted and summarised at the end of the run" if before == 0 else "")
