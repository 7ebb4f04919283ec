"""Training and evaluation pipelines over shards.

Both streams are record streams (`dlscale.data.records`): DataLoader workers read and prepare a share of a rank's
records each (resize, normalise, and in training augment with a generator seeded by (seed, epoch, rank, record)),
the training process receives them in their fixed order and cuts the batches there; batches are a pure function of
(seed, epoch, rank) and of the data, whatever the number of workers.

Train: shards are drawn with replacement from an RNG seeded by (seed, epoch, rank), their records mixed in a
shuffle buffer; every rank yields exactly `batches_per_epoch` batches, so no rank waits on another at a
collective. A record that does not decode is lost alone, everything after a cut or unreadable part of a shard is
lost; lost records are skipped and counted (fatal with `strict`): the first skip of a rank is a warning, each shard
read cut short is counted once in the stream's `SkipCounter`, and the run reports the totals once at its end.

Eval: shard i goes to rank i mod world: every sample exactly once across all ranks and workers, whatever their
number; a rank without shards simply yields nothing and still joins the final gather. Batches are cut per shard (a
shard's samples in batches of `batch_size`, a short last one), in shard order, so neither which images share a batch
nor the order of the batches depends on the number of ranks or workers. A corrupt shard fails the evaluation, except
in a `tolerant` stream (the linear probe's train features), which skips and counts it like the training stream.

Training batches are planned ahead (`dlscale.data.plan`: the shuffle buffer's decisions depend only on its seed and
the records' row counts), so the workers write each row straight into its batch in shared memory
(`dlscale.data.ring`) and this process hands the batches on without copying them; with a GPU present it copies each
into page-locked memory, so `finish_batch` copies it to the device asynchronously. Memory per rank: `RecordLoader`.

Why not `webdataset.WebDataset` here: its tar stream parser caps a worker at ~20-30k samples/s (1x64x64 records,
measured); the shards stay plain WebDataset tars (tests read them with `webdataset`), only the reader is ours.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dlscale.data.buffers import BufferPool
from dlscale.data.records import Read, RecordLoader, RecordStream, records_in_flight, worker_start
from dlscale.data.plan import ShufflePlan
from dlscale.data.ring import LENT, BatchRing, empty_rows
from dlscale.data.shardset import ShardSet
from dlscale.data.stream_config import StreamConfig
from dlscale.data.tario import CorruptShardError
from dlscale.data.transforms import NO_AUGMENTATION, RAW, chunk_rows, dihedral_choices, resize_to, transform


def _generator(seeds: list[int], *key: int) -> torch.Generator:
    """A torch generator for the part `key` of the epoch seeded by `seeds` (a record, a batch): a function of its
    place in the epoch, never of the worker that draws from it."""
    return torch.Generator().manual_seed(int(np.random.default_rng(seeds + list(key)).integers(2**62)))


RECORD_KEY, BATCH_KEY, SHUFFLE_KEY = 2, 1, 3   # seed words: a record's augmentation, a batch's, the shuffle buffer


def _batch(rows: tuple, cfg: StreamConfig, generator: torch.Generator | None) -> dict:
    """A batch of rows (images, labels, ids, targets or None) finished in the records' worker (`transforms=host`),
    or left raw with the seed of its augmentation (`RAW`, drawn from `generator`) for `finish_batch`."""
    images, labels, ids, targets = rows
    batch = {"image": images, "label": labels, "ids": ids}
    if targets is not None:
        batch["target"] = targets
    if cfg.transforms == "device":
        augmented = generator is not None and cfg.augment
        batch[RAW] = torch.randint(0, 2**62, (), generator=generator) if augmented else torch.tensor(NO_AUGMENTATION)
    return batch


class TrainStream(RecordStream):
    """Endless resampled stream cut to `batches_per_epoch` batches per rank; call `set_epoch` before each epoch."""

    def __init__(self, shards: ShardSet, rank: int, world: int, batches_per_epoch: int, seed: int = 0):
        super().__init__(shards, rank, world)
        self.batches_per_epoch, self.seed, self.epoch = batches_per_epoch, seed, 0
        self.image_shape = shards.cfg.output_shape(shards.image_shape)   # of the batches (after data.resize)
        self.max_failures = 10 * len(shards.urls) + 10
        self.allocate = BufferPool(RECORD_READS_KEPT).take    # reads of pipes and remote shards
        self.mapped = True     # `prepare` writes records into the ring, never into the decoded ones
        self.persistent = True
        self.shared_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()   # what the kept workers read

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.shared_epoch[0] = epoch

    def reads(self) -> Iterator[Read]:
        """This worker's records, each handed on once the spill rows of the batches cut at it are in their places
        (lost or not, its batches are); a worker (kept from epoch to epoch) first takes the epoch this process set
        and makes its shuffle plan."""
        if get_worker_info() is not None:
            self.epoch = int(self.shared_epoch[0])
            self.plan = self._plan(writer=True, reader=False)
        for read in super().reads():
            self.ring.fill(self.plan.fills(read.j))
            yield read

    def worker_state(self) -> object:
        return self.ring      # a new ring (another layout): new workers, which map it

    def seeds(self) -> list[int]:
        return [self.seed, self.epoch, self.rank]

    def draws(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seeds())
        while True:
            yield int(rng.integers(len(self.shards.urls)))

    def record_counts(self) -> Iterator[int]:
        """The rows of the epoch's records in order, as the manifest gives them (a shard's records are full but its
        last)."""
        spr = self.shards.manifest["record_layout"]["samples_per_record"]
        for index in self.draws():
            shard = self.shards.shards[index]
            yield from (min(spr, shard["samples"] - r * spr) for r in range(shard["records"]))

    def prepare(self, rows: tuple, j: int) -> int:
        """Write record j's rows into the batch ring where the shuffle plan puts them, transformed on the way there
        (`transforms=host`: resized, then normalised and augmented in one pass per image, `write_rows`); returns its
        rows."""
        cfg, (images, *rest) = self.shards.cfg, rows
        place = self.plan.place(j)
        if len(images) != len(place.position):
            raise CorruptShardError(f"record {j} of the epoch holds {len(images)} samples, its shard's manifest entry "
                                    f"{len(place.position)}")
        target = self.ring.rows(place)
        store, *parts = self.ring.store
        if cfg.transforms == "device":
            store.index_copy_(0, target, images)
        else:
            images = resize_to(images, cfg)
            choices = dihedral_choices(images, _generator(self.seeds(), j, RECORD_KEY)).numpy() if cfg.augment else \
                np.zeros(len(images), dtype=np.int64)
            from dlscale.data.rowwrite import write_rows     # numba: only where images are transformed on the host
            write_rows(images, cfg.normalize, choices, store, target.numpy(), self.ring.work())
        for part, source in zip(parts, rest):
            if part is not None:
                part.index_copy_(0, target, source)
        return len(images)

    def _pool_rows(self) -> tuple[int, int, int]:
        """(rows the shuffle buffer fills to before cutting, rows it keeps after, its capacity)."""
        cfg, spr = self.shards.cfg, self.shards.manifest["record_layout"]["samples_per_record"]
        low = max(cfg.shuffle_buffer, cfg.batch_size) // 2
        return 2 * low + cfg.batch_size, low + cfg.batch_size, 2 * low + cfg.batch_size + spr

    def start(self, workers: int) -> None:
        cfg, spr = self.shards.cfg, self.shards.manifest["record_layout"]["samples_per_record"]
        bs = cfg.batch_size
        full, keep, capacity = self._pool_rows()
        # rows go straight into batches up to about two buffer fills ahead of their record (~7% of them outlive that
        # and wait in spill rows); the workers may be ahead of this process by their queued records
        window = max(1, math.ceil(WINDOW_FILLS * full / bs))
        slots = window + math.ceil((records_in_flight(workers) * workers + 1) * spr / bs) + 1 + LENT
        spill = 2 * capacity
        self.plan_sizes = (bs, full, keep, capacity, self.batches_per_epoch, window, spill)
        self.cuts = self._plan(writer=workers == 0, reader=True)     # this process's
        self.plan = self.cuts if workers == 0 else None              # each worker makes its own (`reads`)
        ring = getattr(self, "ring", None)
        on_host = cfg.transforms != "device"
        logs = on_host and cfg.normalize == "log"    # the one method that writes images before the ring
        work = (max(1, workers), chunk_rows(4 * math.prod(self.image_shape)) if logs else 0)   # (writers, rows each)
        if on_host:   # numba is imported here, not with the module: a GPU node transforming on the device needs none
            from dlscale.data.rowwrite import compile_row_writer
            compile_row_writer()     # here, before the workers fork, not in each of them
        if ring is None or ring.layout != (slots, bs, spill, work) or ring.shared != (workers > 0):
            shape = self.shards.image_shape if cfg.transforms == "device" else self.image_shape   # as `prepare` writes
            rows = [(shape, torch.float32), ((), torch.int64), ((3,), torch.int64),
                    ((len(cfg.targets),), torch.float32) if cfg.targets else None]
            if workers:
                _check_shared_memory(BatchRing.nbytes(slots, bs, spill, work, rows))
            self.ring = BatchRing(slots, bs, spill, work, rows, shared=workers > 0)
        self.ring.begin_epoch()

    def _plan(self, writer: bool, reader: bool) -> ShufflePlan:
        """The epoch's shuffle plan, of the sizes `start` set: a writer's, the reader's or both."""
        return ShufflePlan(self.record_counts, np.random.default_rng(self.seeds() + [SHUFFLE_KEY]), *self.plan_sizes,
                           writer, reader)

    def assemble(self, reads: Iterator[Read], pin: bool) -> Iterator[dict]:
        cfg, seeds = self.shards.cfg, self.seeds()
        plan, error = self.cuts, None
        lost = np.empty((0, 2), dtype=np.int64)     # the row numbers of the lost records, [start, stop) in order
        k = failures = 0     # k: the batch of this rank's epoch about to be cut
        seeded = cfg.transforms == "device" and cfg.augment    # batches carry their augmentation's seed
        counted: set[int] = set()
        for read in reads:
            if read.rows is None:
                if cfg.strict:
                    raise read.error
                failures += read.draw not in counted
                self._lost(read, counted)
                if failures > self.max_failures:
                    raise RuntimeError(f"{failures} consecutive shard failures in split {self.shards.split!r}; "
                                       f"last: {read.error}") from read.error
                rows = plan.rows_of(read.j)
                lost = np.concatenate([lost, [[rows.start, rows.stop]]])
                error = read.error
            else:
                failures = 0
            for cut in plan.cuts(read.j):
                gone = _among(cut.rows, lost)
                if gone is not None and gone.all():
                    raise RuntimeError(f"batch {k} of split {self.shards.split!r} holds no sample: each was in a lost "
                                       f"record ({failures} consecutive shard failures in split "
                                       f"{self.shards.split!r}, {len(lost)} records lost in all; last: {error})")
                rows = self.ring.batch(cut, gone, pin)
                yield _batch(rows, cfg, _generator(seeds, k, BATCH_KEY) if seeded else None)
                k += 1
            self.ring.done(read.j)
            if k >= self.batches_per_epoch:
                return


def _among(rows: np.ndarray, ranges: np.ndarray) -> np.ndarray | None:
    """Which of `rows` (row numbers) lie in one of `ranges` ([start, stop) rows, in order; None: no range)."""
    if not len(ranges):
        return None
    i = np.searchsorted(ranges[:, 0], rows, side="right") - 1
    return (i >= 0) & (rows < ranges[np.maximum(i, 0), 1])


WINDOW_FILLS = 2
"""How far ahead of its record a row may go straight into its batch, in shuffle-buffer fills (2: ~7% of the rows
wait in spill rows at the default sizes, measured)."""
RECORD_READS_KEPT = 2
"""Records' bytes a worker keeps for reuse: the record being prepared and the next one's first member (the tar reader
reads it to see that the record before has ended)."""


def _check_shared_memory(nbytes: int, where: str = "/dev/shm") -> None:
    """Refuse a ring that shared memory cannot hold (a container's default /dev/shm is 64 MB): writing past it would
    kill the process with SIGBUS instead of an error."""
    try:
        stat = os.statvfs(where)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        raise RuntimeError(f"data.num_workers > 0: the training stream's batch ring needs {nbytes / 2**20:.0f} MiB "
                           f"of shared memory, {where} has {free / 2**20:.0f} MiB free; enlarge it (docker run "
                           "--shm-size, a Kubernetes emptyDir of medium Memory), lower data.shuffle_buffer, or use "
                           "data.num_workers=0")


def _concat(records: list[tuple], pin: bool) -> tuple:
    return tuple(None if parts[0] is None else torch.cat(parts, out=empty_rows(parts[0], sum(map(len, parts)), pin))
                 for parts in zip(*records))


class EvalStream(RecordStream):
    """Every sample of the split (or of its first `shard_limit` shards) exactly once across all ranks and workers, in
    batches cut per shard; `tolerant`: every readable sample, corrupt parts skipped and counted in `skips`."""

    def __init__(self, shards: ShardSet, rank: int, world: int, tolerant: bool = False,
                 shard_limit: int | None = None):
        super().__init__(shards, rank, world)
        self.tolerant = tolerant
        self.shard_count = len(shards.urls) if shard_limit is None else min(shard_limit, len(shards.urls))

    def draws(self) -> Iterator[int]:
        return iter(range(self.rank, self.shard_count, self.world))

    def prepare(self, rows: tuple, j: int) -> tuple:
        cfg = self.shards.cfg
        return rows if cfg.transforms == "device" else (transform(rows[0], cfg, None), *rows[1:])

    def assemble(self, reads: Iterator[Read], pin: bool) -> Iterator[dict]:
        cfg, bs = self.shards.cfg, self.shards.cfg.batch_size
        pending, draw, counted = [], None, set()
        for read in reads:
            if read.draw != draw and pending:   # the shard's short last batch (what was read of a corrupt shard,
                yield _batch(_concat(pending, pin), cfg, None)   # when tolerated)
                pending = []
            draw = read.draw
            if read.rows is None:
                if not self.tolerant:
                    raise read.error
                self._lost(read, counted)
                continue
            pending.append(read.rows)
            if sum(len(r[1]) for r in pending) >= bs:
                *batches, rest = _cut(_concat(pending, pin), bs)
                yield from (_batch(rows, cfg, None) for rows in batches)
                pending = [rest] if len(rest[1]) else []
        if pending:
            yield _batch(_concat(pending, pin), cfg, None)


def _cut(joined: tuple, bs: int) -> list[tuple]:
    """Full batches of `bs` rows and the rest (maybe empty): views of `joined`, which nothing else holds."""
    n = len(joined[1])
    bounds = list(range(0, n - n % bs, bs)) + [n - n % bs]
    return [tuple(None if t is None else t[a:b] for t in joined) for a, b in zip(bounds, bounds[1:] + [n])]


def batches_per_epoch(num_samples: int, batch_size: int, world: int) -> int:
    """Batches each rank yields per epoch so that one epoch sees about the split once."""
    return max(1, num_samples // (batch_size * world))


def train_loader(data_dir: Path | str, cfg: StreamConfig, rank: int = 0, world: int = 1, seed: int = 0,
                 split: str = "train", batches: int | None = None) -> DataLoader:
    shards = ShardSet(data_dir, split, cfg)
    n = batches or batches_per_epoch(shards.num_samples, cfg.batch_size, world)
    return make_loader(TrainStream(shards, rank, world, n, seed), cfg)


def eval_loader(data_dir: Path | str, cfg: StreamConfig, rank: int = 0, world: int = 1,
                split: str = "val", tolerant: bool = False, shard_limit: int | None = None) -> DataLoader:
    return make_loader(EvalStream(ShardSet(data_dir, split, cfg), rank, world, tolerant, shard_limit), cfg)


def leading_shards(shards: list[dict], samples: int) -> int:
    """How many leading shards of a split (manifest entries) hold at least `samples` samples (all if fewer)."""
    held = 0
    for count, shard in enumerate(shards, 1):
        held += shard["samples"]
        if held >= samples:
            return count
    return len(shards)


def make_loader(dataset: IterableDataset, cfg: StreamConfig):
    """One epoch's batches of a stream (a new iterator per epoch re-reads `set_epoch`): a `RecordLoader` over a
    shard stream, a DataLoader over a stream that batches itself in its workers."""
    if isinstance(dataset, RecordStream):
        return RecordLoader(dataset, cfg)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None,
                      multiprocessing_context=worker_start(cfg.num_workers))
