"""Training and evaluation pipelines over shards.

Both streams see a rank's epoch as a fixed sequence of shard reads and number their records j = 0, 1, ... in order.
DataLoader worker w of W reads and decodes only the records j = w (mod W) (it skips the others' bytes, a seek on
local files) and prepares them (resize, normalise, and in training augment with a generator seeded by (seed, epoch,
rank, j)); the DataLoader collects its workers' items round-robin, so the training process receives the records in
the order of j whatever W is, and cuts the batches there (`RecordLoader`). Records decoded per epoch = the records
the epoch reads, for any number of workers; batches are a pure function of (seed, epoch, rank) and of the data.

Train: shards are drawn with replacement from an RNG seeded by (seed, epoch, rank), their records mixed in a
tensor-level shuffle buffer; every rank yields exactly `batches_per_epoch` batches, so no rank waits on another at a
collective. A record that does not decode is lost alone, everything after a cut or unreadable part of a shard is
lost; lost records are skipped and counted (fatal with `strict`): the first skip of a rank is a warning, each shard
read cut short is counted once in the stream's `SkipCounter`, and the run reports the totals once at its end.

Eval: shard i goes to rank i mod world: every sample exactly once across all ranks and workers, whatever their
number; a rank without shards simply yields nothing and still joins the final gather. Batches are cut per shard (a
shard's samples in batches of `batch_size`, a short last one), in shard order, so neither which images share a batch
nor the order of the batches depends on the number of ranks or workers. A corrupt shard fails the evaluation, except
in a `tolerant` stream (the linear probe's train features), which skips and counts it like the training stream.

Memory per rank: see `RecordLoader`. With a GPU present the batches are cut into page-locked memory, so
`finish_batch` copies them to the device asynchronously.

Why not `webdataset.WebDataset` here: its tar stream parser caps a worker at ~20-30k samples/s (1x64x64 records,
measured); the shards stay plain WebDataset tars (tests read them with `webdataset`), only the reader is ours.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dlscale.data.shards import decode_record, load_manifest
from dlscale.data.corrupt import SkipCounter, count_skip
from dlscale.data.tario import CorruptShardError, ReadIntoAdapter, iter_records

log = logging.getLogger(__name__)
NORMALIZATIONS = ("minmax", "standardize", "log", "none")
RESIZE_MODES = ("interpolate", "crop")
TRANSFORM_PLACES = ("auto", "host", "device")
EPS = 1e-8


@dataclass
class StreamConfig:
    """How shards become batches."""
    batch_size: int = 64
    """per rank (DeepSpeed's micro batch)"""
    num_workers: int = 2
    """DataLoader worker processes per rank; they share the rank's records (each decodes only its own) and the
    batches do not depend on their number (training with workers keeps its records in /dev/shm: docs/throughput.md)"""
    normalize: str = "minmax"
    """per image: minmax to [0,1] | standardize | log (log1p above min, then minmax) | none"""
    augment: bool = True
    """random flips and 90-degree rotations in training (no preferred orientation; the dihedral group is exact)"""
    shuffle_buffer: int = 4096
    """samples mixed across records before batching"""
    strict: bool = False
    """a corrupt training shard/record is fatal instead of skipped and counted"""
    allow_pipe: bool = False
    """allow `pipe:` shard URLs (they run shell commands)"""
    url_template: str | None = None
    """shard location, e.g. "pipe:aws s3 cp s3://bucket/set/{name} -"; default: the data directory"""
    targets: list[str] = field(default_factory=list)
    """metadata keys returned as regression targets (`target`)"""
    resize: int | None = None
    """batches become resize x resize: another image size than the encoder's"""
    resize_mode: str = "interpolate"
    """interpolate (bilinear, antialiased) | crop (centre crop of larger images)"""
    transforms: str = "auto"
    """where resize / normalise / augment run: host (DataLoader workers) | device (the training GPU, inside the
    step; workers only read records) | auto (device when training on CUDA)"""

    def __post_init__(self) -> None:
        StreamConfig.validate(self)

    def validate(self) -> "StreamConfig":
        """Raise naming the `data.*` key that is out of range (run on construction, and by `Config.validate`)."""
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"data.normalize={self.normalize!r}: expected one of {NORMALIZATIONS}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.batch_size must be >= 1, data.num_workers and data.shuffle_buffer >= 0")
        if self.transforms not in TRANSFORM_PLACES:
            raise ValueError(f"data.transforms={self.transforms!r}: expected one of {TRANSFORM_PLACES}")
        if self.resize is not None and self.resize < 1 or self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"data.resize={self.resize!r} / data.resize_mode={self.resize_mode!r}: expected a side "
                             f">= 1 (or null) and a mode among {RESIZE_MODES}")
        return self

    def output_shape(self, shape) -> tuple[int, ...]:
        """(C, H, W) of the batches made from stored images of `shape`: what the model sees."""
        shape = tuple(int(s) for s in shape)
        if self.resize is None:
            return shape
        if self.resize_mode == "crop" and min(shape[1:]) < self.resize:
            raise ValueError(f"data.resize={self.resize} with resize_mode=crop: images are {list(shape)}, smaller "
                             "than the crop; use data.resize_mode=interpolate")
        return (shape[0], self.resize, self.resize)


class ShardSet:
    """The shards of one split: where they are and how to read their records."""

    def __init__(self, data_dir: Path | str, split: str, cfg: StreamConfig):
        self.data_dir, self.split, self.cfg = Path(data_dir), split, cfg
        self.manifest = load_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{data_dir}: no {split!r} split (has {', '.join(self.manifest['splits'])})")
        self.shards = self.manifest["splits"][split]["shards"]
        self.num_samples = self.manifest["splits"][split]["samples"]
        self.urls = [self._url(s["name"]) for s in self.shards]
        self.image_shape = tuple(self.manifest["image_shape"])

    def _url(self, name: str) -> str:
        template = self.cfg.url_template
        if not template:
            return str(self.data_dir / name)
        import shlex   # a name goes into a shell command line as one quoted word, whatever it holds
        url = template.format(name=shlex.quote(name) if template.startswith("pipe:") else name)
        if url.startswith("pipe:") and not self.cfg.allow_pipe:
            raise ValueError(f"shard URL {url!r} runs a shell command; set data.allow_pipe=true to allow it")
        return url

    def open(self, index: int) -> BinaryIO:
        url = self.urls[index]
        if "://" in url or url.startswith("pipe:"):
            from webdataset.gopen import gopen
            return ReadIntoAdapter(gopen(url, "rb"))
        return open(url, "rb", buffering=1 << 20)

    def records(self, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Decoded records of shard `index`: images, labels, ids (shard, record, position), targets or None."""
        with self.open(index) as stream:
            for r, (key, record) in enumerate(iter_records(stream, self.shards[index]["name"])):
                yield self.decode(index, r, key, record)

    def decode(self, index: int, r: int, key: str, record: dict) -> tuple:
        """Record `r` (tar key `key`) of shard `index` as (images, labels, ids, targets or None) tensors."""
        where = f"{self.shards[index]['name']}:{key}"
        images, labels, metas = decode_record(record, self.manifest["record_layout"], self.image_shape,
                                              len(self.manifest["classes"]), where, bool(self.cfg.targets))
        if len(labels) > self.manifest["record_layout"]["samples_per_record"]:
            raise CorruptShardError(f"{where}: {len(labels)} samples, the manifest's records hold at most "
                                    f"{self.manifest['record_layout']['samples_per_record']}")
        ids = np.stack([np.full(len(labels), index), np.full(len(labels), r), np.arange(len(labels))], 1)
        return (torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(ids),
                torch.tensor(extract_targets(metas, self.cfg.targets, where)) if self.cfg.targets else None)

    def describe(self, ids: torch.Tensor) -> list[str]:
        """Human-readable sample keys ("train-000003.tar:record 5:sample 17") for ids from a batch."""
        return [f"{self.shards[s]['name']}:record {r}:sample {p}" for s, r, p in ids.tolist()]


def extract_targets(metas: list[dict], keys: list[str], where: str) -> np.ndarray:
    try:
        return np.array([[float(m[k]) for k in keys] for m in metas], dtype=np.float32)
    except KeyError as err:
        raise ValueError(f"{where}: sample metadata has no regression target {err}; available: "
                         f"{sorted(metas[0]) if metas else []}") from None


def normalize(images: torch.Tensor, method: str, inplace: bool = False) -> torch.Tensor:
    """Per-image normalisation of a (B,C,H,W) batch (raw physical values stay in the shards).

    `inplace` reuses the batch's memory: fresh large tensors cost page faults on every batch (~0.7 ms per MB here).
    """
    if method == "none":
        return images
    flat = (images if inplace else images.clone()).flatten(1)
    if method == "standardize":
        var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        return flat.sub_(mean).mul_(1.0 / (var.sqrt() + EPS)).view_as(images)
    if method == "log":
        flat = flat.sub_(flat.amin(1, keepdim=True)).log1p_()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)   # faster than aminmax(dim=) on CPU here
    return flat.sub_(lo).mul_(1.0 / (hi - lo + EPS)).view_as(images)


def resize(images: torch.Tensor, side: int, mode: str = "interpolate") -> torch.Tensor:
    """(B,C,H,W) -> (B,C,side,side): bilinear with antialiasing (`interpolate`), or the centre `crop`."""
    h, w = images.shape[-2:]
    if (h, w) == (side, side):
        return images
    if mode == "crop":
        top, left = (h - side) // 2, (w - side) // 2
        return images[..., top:top + side, left:left + side].contiguous()
    return torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                                           antialias=True)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply one of the 8 dihedral transforms (90-degree rotations x optional flip), drawn per image, in place of
    the images' order (a record's images may arrive grouped by class: the draw must not follow their order)."""
    square = images.shape[2] == images.shape[3]
    choices = torch.randint(0, 8 if square else 4, (len(images),), generator=generator)
    out = torch.empty_like(images)
    for k in torch.unique(choices).tolist():
        rows = (choices == k).nonzero().flatten()
        x = images.index_select(0, rows)
        x = x.flip(3) if k % 2 else x
        x = x.flip(2) if (k // 2) % 2 else x
        out.index_copy_(0, rows, x.transpose(2, 3) if k >= 4 else x)
    return out


RAW = "raw"
"""The one control key of a batch: present on a batch left raw by `transforms=device` (its images as stored), its
value the seed of the batch's augmentation (`NO_AUGMENTATION`: none). `finish_batch` reads and removes it; the model
never sees it. (0.x batches also had `augment_seed`: now the value of `raw`.)"""
NO_AUGMENTATION = -1


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


def transform(images: torch.Tensor, cfg: StreamConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Resize, normalise (in place) and, with a generator, augment a batch, on whatever device it sits."""
    if cfg.resize is not None:
        images = resize(images, cfg.resize, cfg.resize_mode)
    images = normalize(images, cfg.normalize, inplace=True)
    return augment(images, generator) if generator is not None else images


def finish_batch(batch: dict, cfg: StreamConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """The batch on the training device: images moved (asynchronously from pinned memory) and, for a batch left raw
    by `transforms=device`, transformed there, so a GPU node's host only reads and pins records."""
    images = batch["image"].to(device, non_blocking=True)
    if RAW in batch:
        seed = int(batch[RAW])
        generator = None if seed == NO_AUGMENTATION else torch.Generator().manual_seed(seed)
        images = transform(images.float(), cfg, generator)
    rest = {k: finish_batch(v, cfg, device, dtype) if isinstance(v, dict) and "image" in v else v   # a second
            for k, v in batch.items() if k != RAW}                                                # domain's batch
    return {**rest, "image": images.to(dtype)}


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _generator(seeds: list[int], *key: int) -> torch.Generator:
    """A torch generator for the part `key` of the epoch seeded by `seeds` (a record, a batch): a function of its
    place in the epoch, never of the worker that draws from it."""
    return torch.Generator().manual_seed(int(np.random.default_rng(seeds + list(key)).integers(2**62)))


RECORD_KEY, BATCH_KEY, SHUFFLE_KEY = 2, 1, 3   # seed words: a record's augmentation, a batch's, the shuffle buffer


def _empty_like(t: torch.Tensor, rows: int, pin: bool) -> torch.Tensor:
    """Fresh rows shaped like `t`'s, in page-locked memory when `pin` (a GPU copies them asynchronously)."""
    return torch.empty((rows, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)


def _shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor in shared memory (made the way torch's `default_collate` makes its batches in workers, without
    `share_memory_()`'s copy). Zeroing maps every page into this process once: reading rows the workers wrote then
    costs no page faults, which made gathering batches from fresh pages ~5x slower here."""
    empty = torch.empty(0, dtype=dtype)
    return empty.new(empty._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape).zero_()


def _check_shared_memory(nbytes: int, where: str = "/dev/shm") -> None:
    """Refuse a ring that shared memory cannot hold (a container's default /dev/shm is 64 MB): writing past it would
    kill the process with SIGBUS instead of an error."""
    try:
        stat = os.statvfs(where)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        raise RuntimeError(f"data.num_workers > 0: the training stream's record ring needs {nbytes / 2**20:.0f} MiB "
                           f"of shared memory, {where} has {free / 2**20:.0f} MiB free; enlarge it (docker run "
                           "--shm-size, a Kubernetes emptyDir of medium Memory), lower data.shuffle_buffer, or use "
                           "data.num_workers=0")


class RecordRing:
    """Shared-memory record slots that DataLoader workers write a training epoch's prepared records into (record j
    into slot j mod `record_slots`) and the main process's shuffle buffer draws from, plus `spill` rows where that
    buffer keeps the rows that outlive their record's slot. Made anew for each epoch, before the workers start.

    A worker writes record j only once the main process has released record j - record_slots (`released`): with
    slots for every record a worker may be asked for ahead of the main process (`RECORDS_IN_FLIGHT` per worker) plus
    the buffer's own, it never waits; the check keeps a slot from being rewritten under the buffer whatever the
    DataLoader's timing."""

    def __init__(self, record_slots: int, spill_rows: int, samples_per_record: int, rows: list, shared: bool):
        self.record_slots, self.samples_per_record = record_slots, samples_per_record
        self.spill_start = record_slots * samples_per_record
        shapes = [None if row is None else ((self.spill_start + spill_rows, *row[0]), row[1]) for row in rows]
        if shared:
            _check_shared_memory(sum(math.prod(s) * d.itemsize for s, d in filter(None, shapes)))
        make = _shared_zeros if shared else lambda shape, dtype: torch.zeros(shape, dtype=dtype)
        self.store = [None if shape is None else make(*shape) for shape in shapes]
        self.released = torch.full((1,), -1, dtype=torch.int64).share_memory_()

    def first_row(self, j: int) -> int:
        return (j % self.record_slots) * self.samples_per_record

    def write(self, j: int, rows: tuple) -> int:
        """A worker: copy record j's rows into its slot; returns how many."""
        deadline = time.monotonic() + RING_WAIT_S
        while int(self.released[0]) < j - self.record_slots:
            if time.monotonic() > deadline:
                raise RuntimeError(f"record {j}: its ring slot was not released within {RING_WAIT_S} s")
            time.sleep(0.001)
        start, n = self.first_row(j), len(rows[1])
        for store, t in zip(self.store, rows):
            if store is not None:
                store[start:start + n].copy_(t)
        return n


RING_WAIT_S = 600


class ShuffleBuffer:
    """The main process's sample pool over a `RecordRing`: which ring rows it holds. A record's rows join when it
    arrives and leave with the batches that take them (gathered once, into fresh memory); the rows still held when
    their record's slot is due to be rewritten move to spill rows (one copy, for the few that linger)."""

    def __init__(self, ring: RecordRing, capacity: int, rng: np.random.Generator, pin: bool = False):
        self.ring, self.rng, self.pin = ring, rng, pin
        self.free = np.arange(ring.spill_start, len(ring.store[1]))[::-1].copy()   # spill rows not in use
        self.n_free = len(self.free)
        self.occupied = np.empty(capacity, dtype=np.int64)
        self.n = 0

    def put(self, j: int, count: int) -> None:
        start = self.ring.first_row(j)
        self.occupied[self.n:self.n + count] = np.arange(start, start + count)
        self.n += count

    def release(self, j: int) -> None:
        """Move the rows of record j still held to spill rows, and let the workers rewrite its slot."""
        start = self.ring.first_row(j)
        held = np.flatnonzero((self.occupied[:self.n] >= start) &
                              (self.occupied[:self.n] < start + self.ring.samples_per_record))
        if len(held):
            spill = self.free[self.n_free - len(held):self.n_free].copy()
            self.n_free -= len(held)
            source, target = torch.from_numpy(self.occupied[held]), torch.from_numpy(spill)
            for store in self.ring.store:
                if store is not None:
                    store.index_copy_(0, target, store.index_select(0, source))
            self.occupied[held] = spill
        self.ring.released[0] = j

    def shuffle(self) -> None:
        self.occupied[:self.n] = self.occupied[self.rng.permutation(self.n)]

    def take(self, k: int) -> tuple:
        """The next `k` samples, in fresh memory (pinned when the buffer pins)."""
        rows = self.occupied[self.n - k:self.n].copy()
        self.n -= k
        spilled = rows[rows >= self.ring.spill_start]
        self.free[self.n_free:self.n_free + len(spilled)] = spilled
        self.n_free += len(spilled)
        index = torch.from_numpy(rows)   # index_select: ~6x faster than store[index] here
        return tuple(None if store is None else torch.index_select(store, 0, index, out=_empty_like(store, k, self.pin))
                     for store in self.ring.store)


class Read(NamedTuple):
    """One record of a rank's epoch as a worker hands it over: `j` its place in the epoch, `draw` the shard read it
    belongs to (`shard` its index, `record` its place there), `rows` what `RecordStream.hand_over` made of it (the
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

    def __init__(self, shards: ShardSet, rank: int, world: int):
        self.shards, self.rank, self.world = shards, rank, world
        self.skips = SkipCounter(len(shards.urls))

    def draws(self) -> Iterator[int]:
        """Shard indices of the epoch's reads, in order (the same in every worker)."""
        raise NotImplementedError

    def prepare(self, rows: tuple, j: int) -> tuple:
        """What a worker does to record j after decoding it."""
        return rows

    def hand_over(self, rows: tuple, j: int):
        """What a worker sends the main process for prepared record j (`Read.rows`): the rows themselves."""
        return rows

    def start(self, workers: int) -> None:
        """Before an epoch's workers start (`workers` of them)."""

    def assemble(self, reads: Iterator[Read], pin: bool) -> Iterator[dict]:
        """The main process: batches from the records in order of j (pinned when `pin`)."""
        raise NotImplementedError

    def reads(self) -> Iterator[Read]:
        """This worker's records, in order of j."""
        worker, workers = _worker()
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
            with self.shards.open(index) as stream:
                for r, (key, record) in enumerate(iter_records(stream, name, mine)):
                    if r >= count:
                        break
                    passed = r + 1
                    if record is None:
                        continue
                    try:
                        rows = self.hand_over(self.prepare(self.shards.decode(index, r, key, record), j + r), j + r)
                    except CorruptShardError as err:
                        yield Read(j + r, draw, index, r, worker, None, err)
                        continue
                    yield Read(j + r, draw, index, r, worker, rows, None)
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
    """The DataLoader's view of a record stream: each worker's records (`RecordStream.reads`)."""

    def __init__(self, stream: RecordStream):
        self.stream = stream

    def __iter__(self) -> Iterator[Read]:
        return self.stream.reads()


class RecordLoader:
    """One epoch of a record stream's batches: DataLoader workers read and prepare records, this process cuts the
    batches in their fixed order. `dataset` is the stream (as on a DataLoader).

    Memory per rank, in samples (spr: samples per record, buffer: max(shuffle_buffer, batch_size) + batch_size):
    `TrainStream`: its `RecordRing`, about (2 x workers + 3) x spr + 3 x buffer (two buffers' worth of records live in
    their slots, one of spill rows), plus a record being read by each worker (1x150x150 images, records of 256, the
    default shuffle buffer, batch 128, 8 workers: ~17,800 samples, 1.6 GB);
    `EvalStream`: one batch plus (3 x workers + 1) records, 2 queued per worker and one being read by each."""

    def __init__(self, stream: RecordStream, cfg: StreamConfig):
        self.dataset, self.cfg = stream, cfg

    def __iter__(self) -> Iterator[dict]:
        workers = self.cfg.num_workers
        self.dataset.start(workers)
        records = DataLoader(_Reads(self.dataset), batch_size=None, num_workers=workers,
                             prefetch_factor=RECORDS_IN_FLIGHT if workers else None, persistent_workers=False)
        return self._in_order(iter(records))

    def _in_order(self, records) -> Iterator[dict]:
        def checked() -> Iterator[Read]:
            for j, read in enumerate(records):
                if read.j != j:
                    raise RuntimeError(f"record {read.j} arrived as the epoch's record {j}: workers out of step")
                yield read
        yield from self.dataset.assemble(checked(), pin=torch.cuda.is_available())


RECORDS_IN_FLIGHT = 2
"""Records each worker may have queued for the main process (the DataLoader's prefetch factor)."""


class TrainStream(RecordStream):
    """Endless resampled stream cut to `batches_per_epoch` batches per rank; call `set_epoch` before each epoch."""

    def __init__(self, shards: ShardSet, rank: int, world: int, batches_per_epoch: int, seed: int = 0):
        super().__init__(shards, rank, world)
        self.batches_per_epoch, self.seed, self.epoch = batches_per_epoch, seed, 0
        self.image_shape = shards.cfg.output_shape(shards.image_shape)   # of the batches (after data.resize)
        self.max_failures = 10 * len(shards.urls) + 10

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def seeds(self) -> list[int]:
        return [self.seed, self.epoch, self.rank]

    def draws(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seeds())
        while True:
            yield int(rng.integers(len(self.shards.urls)))

    def prepare(self, rows: tuple, j: int) -> tuple:
        cfg = self.shards.cfg
        if cfg.transforms == "device":
            return rows
        images, *rest = rows
        return (transform(images, cfg, _generator(self.seeds(), j, RECORD_KEY) if cfg.augment else None), *rest)

    def _pool_rows(self) -> tuple[int, int, int]:
        """(rows the shuffle buffer fills to before cutting, rows it keeps after, its capacity)."""
        cfg, spr = self.shards.cfg, self.shards.manifest["record_layout"]["samples_per_record"]
        low = max(cfg.shuffle_buffer, cfg.batch_size) // 2
        return 2 * low + cfg.batch_size, low + cfg.batch_size, 2 * low + cfg.batch_size + spr

    def start(self, workers: int) -> None:
        cfg, spr = self.shards.cfg, self.shards.manifest["record_layout"]["samples_per_record"]
        full, _, capacity = self._pool_rows()
        # records whose rows the buffer draws from in their slots: twice those it fills to, so that few rows (~10%)
        # are still held when their slot is released and must move
        self.live_records = 2 * -(-full // spr) + 2
        slots = RECORDS_IN_FLIGHT * workers + self.live_records
        if getattr(self, "ring", None) is not None and self.ring.record_slots == slots and (
                workers == 0 or self.ring.store[1].is_shared()):
            self.ring.released[0] = -1     # the last epoch's workers are gone: its memory serves again
            return
        shape = self.shards.image_shape if cfg.transforms == "device" else self.image_shape   # as `prepare` leaves it
        rows = [(shape, torch.float32), ((), torch.int64), ((3,), torch.int64),
                ((len(cfg.targets),), torch.float32) if cfg.targets else None]
        self.ring = RecordRing(slots, capacity, spr, rows, shared=workers > 0)

    def hand_over(self, rows: tuple, j: int) -> int:
        return self.ring.write(j, rows)

    def assemble(self, reads: Iterator[Read], pin: bool) -> Iterator[dict]:
        cfg, seeds, bs = self.shards.cfg, self.seeds(), self.shards.cfg.batch_size
        full, keep, capacity = self._pool_rows()
        pool = ShuffleBuffer(self.ring, capacity, np.random.default_rng(seeds + [SHUFFLE_KEY]), pin)
        k = failures = 0     # k: the batch of this rank's epoch about to be cut
        counted: set[int] = set()
        for read in reads:
            if read.j + 1 >= self.live_records:   # the slot the workers write next: its rows leave it now
                pool.release(read.j + 1 - self.live_records)
            if read.rows is None:
                if cfg.strict:
                    raise read.error
                failures += read.draw not in counted
                self._lost(read, counted)
                if failures > self.max_failures:
                    raise RuntimeError(f"{failures} consecutive shard failures in split {self.shards.split!r}; "
                                       f"last: {read.error}") from read.error
                continue
            failures = 0
            pool.put(read.j, read.rows)
            if pool.n < full:
                continue
            pool.shuffle()
            while pool.n >= keep and k < self.batches_per_epoch:
                yield _batch(pool.take(bs), cfg, _generator(seeds, k, BATCH_KEY))
                k += 1
            if k >= self.batches_per_epoch:
                return


def _concat(records: list[tuple], pin: bool) -> tuple:
    return tuple(None if parts[0] is None else torch.cat(parts, out=_empty_like(parts[0], sum(map(len, parts)), pin))
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
                      persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
