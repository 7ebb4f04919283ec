"""A rank's epoch as a fixed sequence of shard reads, its records numbered j = 0, 1, ... in order, read in parallel.

DataLoader worker w of W reads and decodes only the records j = w (mod W) (it skips the others' bytes, a seek on
local files) and prepares them; the DataLoader collects its workers' items round-robin, so the main process receives
the records in the order of j whatever W is, and a stream (`dlscale.data.stream`) cuts its batches there
(`RecordLoader`). Records decoded per epoch = the records the epoch reads, for any number of workers.
"""
from __future__ import annotations

import math
import multiprocessing
import sys
import weakref
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dlscale.data.corrupt import SkipCounter, count_skip
from dlscale.data.shardset import ShardSet
from dlscale.data.stream_config import StreamConfig
from dlscale.data.tario import Allocate, CorruptShardError, iter_records


def worker_start(workers: int) -> BaseContext | None:
    """How a DataLoader's workers start (its `multiprocessing_context`): forked from the rank on Linux, however the
    rank itself started. A rank started by spawn or forkserver (`torch.multiprocessing.spawn`, the default of Python
    3.14) would otherwise start each worker, every epoch, as a fresh interpreter importing torch and dlscale
    (seconds of CPU each); forked, a worker starts in milliseconds holding the stream's state. None: the platform's
    default (elsewhere), or no workers."""
    return multiprocessing.get_context("fork") if workers and sys.platform.startswith("linux") else None


def worker_share() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) outside a worker."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class Read(NamedTuple):
    """One record of a rank's epoch as a worker hands it over: `j` its place in the epoch, `draw` the shard read it
    belongs to (`shard` its index, `record` its place there), `rows` what `RecordStream.prepare` made of it (the
    prepared (images, labels, ids, targets or None); a training stream: their count, the rows are in its ring), or
    None with the `error` that lost it."""
    j: int
    draw: int
    shard: int
    record: int
    worker: int
    rows: tuple | int | None
    error: Exception | None


class RecordStream(IterableDataset):
    """A rank's epoch as a fixed sequence of shard reads (`draws`), their records numbered j = 0, 1, ... in order.

    Worker w of W reads and decodes only the records j = w (mod W) (the others' bytes are skipped: a seek on local
    files), prepares them (`prepare`: resize, normalise, augment with a generator seeded by the record's j) and hands
    them over in order; the DataLoader collects its workers' items round-robin, so the main process receives the
    records in the order of j for any W, and `assemble` cuts the batches there. Iterating the stream itself reads
    everything in this process (0 workers)."""

    allocate: Allocate | None = None
    """Where a worker reads records' bytes (`iter_records`): fresh memory unless a stream reuses its own."""
    mapped: bool = False
    """Read local shards through a memory map (`ShardSet.open`): for a stream whose `prepare` never writes into the
    decoded record."""
    persistent: bool = False
    """Keep the DataLoader workers from one epoch to the next (`workers_loader`): for a stream iterated epoch after
    epoch whose workers learn each epoch's state themselves (`reads`)."""

    def __init__(self, shards: ShardSet, rank: int, world: int):
        self.shards, self.rank, self.world = shards, rank, world
        self.skips = SkipCounter(len(shards.urls))

    def draws(self) -> Iterator[int]:
        """Shard indices of the epoch's reads, in order (the same in every worker)."""
        raise NotImplementedError

    def prepare(self, rows: tuple, j: int):
        """What a worker makes of record j after decoding it, and sends the main process (`Read.rows`)."""
        raise NotImplementedError

    def start(self, workers: int) -> None:
        """Before an epoch's workers start (`workers` of them), or resume for a new epoch (`persistent`)."""

    def workers_loader(self, workers: int) -> DataLoader:
        """The DataLoader whose `workers` workers read this epoch's records: a new one, or (`persistent`) the one of
        the epochs before while what its workers copied of this stream still holds (`worker_state`).

        A kept DataLoader is held by a finalizer of the stream, not by the stream, and holds the stream weakly: the
        stream dropped (or collected with its reference cycles), the finalizer lets the DataLoader go and its
        workers are told to stop. (Collected among the stream's cycles, the DataLoader's queues would be closed
        before its workers were told: they would stop only at the join's timeout.)"""
        persistent, key = self.persistent and workers > 0, (workers, self.worker_state())
        kept = getattr(self, "_kept", None)         # [the DataLoader, its key], or empty once let go
        if persistent and kept and kept[1] == key:
            return kept[0]
        if kept:
            kept.clear()
        loader = DataLoader(_Reads(self, weak=persistent), batch_size=None, num_workers=workers,
                            prefetch_factor=records_in_flight(workers) or None, persistent_workers=persistent,
                            multiprocessing_context=worker_start(workers), collate_fn=_as_read)
        if persistent:
            self._kept = [loader, key]
            weakref.finalize(self, self._kept.clear)
        return loader

    def worker_state(self) -> object:
        """What workers copy of this stream when they start and must not change while they serve later epochs
        (`persistent`; compared with `==`)."""
        return None

    def assemble(self, reads: Iterator[Read], pin: bool) -> Iterator[dict]:
        """The main process: batches from the records in order of j (pinned when `pin`)."""
        raise NotImplementedError

    def reads(self) -> Iterator[Read]:
        """This worker's records, in order of j."""
        worker, workers = worker_share()
        j = 0
        for draw, index in enumerate(self.draws()):
            count = self.shards.shards[index]["records"]
            if any((j + r) % workers == worker for r in range(min(count, workers))):
                yield from self._read(draw, index, j, count, worker, workers)
            j += count

    def _read(self, draw: int, index: int, j: int, count: int, worker: int, workers: int) -> Iterator[Read]:
        """This worker's records of shard `index` read as `draw`, the first of them record j of the epoch. A record
        that does not decode is lost alone; every record after a cut or unreadable part of the shard is lost."""
        mine = lambda r: (j + r) % workers == worker   # noqa: E731
        name, passed, error = self.shards.shards[index]["name"], 0, None
        try:
            with self.shards.open(index, self.mapped) as stream:
                for r, (key, record) in enumerate(iter_records(stream, name, mine, self.allocate)):
                    if r >= count:
                        break
                    passed = r + 1
                    if record is None:
                        continue
                    try:
                        rows, lost = self.prepare(self.shards.decode(index, r, key, record), j + r), None
                    except CorruptShardError as err:
                        rows, lost = None, err
                    del record        # its bytes can serve the next read (`allocate`) while this one is handed on
                    yield Read(j + r, draw, index, r, worker, rows, lost)
        except (CorruptShardError, OSError) as err:
            error = err
        if passed < count and error is None:
            error = CorruptShardError(f"{name}: {passed} records, its manifest entry lists {count}")
        yield from (Read(j + r, draw, index, r, worker, None, error) for r in range(passed, count) if mine(r))

    def __iter__(self) -> Iterator[dict]:
        self.start(0)
        return self.assemble(self.reads(), pin=False)

    def _lost(self, read: Read, counted: set) -> None:
        """Count the first lost record of a shard read (the first skip of a rank is a warning)."""
        if read.draw not in counted:
            counted.add(read.draw)
            count_skip(self.skips, self.shards, read.shard, read.record, read.error, self.rank, read.worker)


class _Reads(IterableDataset):
    """The DataLoader's view of a record stream: each worker's records (`RecordStream.reads`). `weak`: held by a
    weak reference (a stream that keeps its DataLoader); a forked worker's copy finds the stream where the rank held
    it, a spawned one gets its own."""

    def __init__(self, stream: RecordStream, weak: bool = False):
        self.stream = weakref.ref(stream) if weak else lambda: stream

    def __iter__(self) -> Iterator[Read]:
        return self.stream().reads()

    def __reduce__(self):
        return _Reads, (self.stream(),)


def _as_read(read: Read) -> Read:
    """The DataLoader's collate function: a worker's `Read` as it is (the default converts it field by field)."""
    return read


class RecordLoader:
    """One epoch of a record stream's batches: DataLoader workers read and prepare records, this process cuts the
    batches in their fixed order. `dataset` is the stream (as on a DataLoader).

    Memory per rank, in samples (spr: samples per record, buffer: max(shuffle_buffer, batch_size) + batch_size):
    `TrainStream`: its `BatchRing` in shared memory, about 4 x buffer + (2 x workers + 3) x spr + 6 x batch_size
    (batch slots for two buffers' worth of batches, for the records the workers may be ahead by and for the batches
    the consumer holds; spill rows for two buffers; with `normalize=log`, ~512 KiB per worker to write the
    logarithms in), plus 2 records' bytes per worker that its reads of pipes and remote shards reuse, plus 4 batches
    of copies for a consumer that holds more than 4 (1x150x150 images, records of 256, the default shuffle buffer,
    batch 128, 8 workers: the ring 22,401 samples, 2.0 GB);
    `EvalStream`: one batch plus (3 x workers + 1) records, 2 queued per worker and one being read by each."""

    def __init__(self, stream: RecordStream, cfg: StreamConfig):
        self.dataset, self.cfg = stream, cfg

    def __iter__(self) -> Iterator[dict]:
        workers = self.cfg.num_workers
        self.dataset.start(workers)
        return self._in_order(iter(self.dataset.workers_loader(workers)))

    def _in_order(self, records) -> Iterator[dict]:
        def checked() -> Iterator[Read]:
            for j, read in enumerate(records):
                if read.j != j:
                    raise RuntimeError(f"record {read.j} arrived as the epoch's record {j}: workers out of step")
                yield read
        yield from self.dataset.assemble(checked(), pin=torch.cuda.is_available())


RECORDS_IN_FLIGHT = 8
"""Records the workers of a rank may have queued for the main process together, at the least (each worker at least
2: the DataLoader's prefetch factor)."""


def records_in_flight(workers: int) -> int:
    """Records each of `workers` workers may have queued (the DataLoader's prefetch factor): together at least
    `RECORDS_IN_FLIGHT`, so that a main process held off its core for a moment (3 processes on 2 cores) does not
    leave the workers idle, and 2 each where there are 4 workers or more (a GPU node's ring pays every record);
    none without workers."""
    return max(2, math.ceil(RECORDS_IN_FLIGHT / workers)) if workers else 0
