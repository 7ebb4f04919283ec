"""Training and evaluation pipelines over shards (DESIGN.md section 6).

Train: each DataLoader worker draws shards with replacement from an RNG seeded by (seed, epoch, rank, worker),
decodes stacked records without pickle, mixes samples in a tensor-level shuffle buffer, and emits normalised,
augmented batches; every rank yields exactly `batches_per_epoch` batches, so no rank waits on another at a
collective. A corrupt record or shard is skipped and counted (fatal with `strict`).

Eval: shard i goes to global worker slot i mod (world x workers): every sample exactly once across all ranks and
workers, whatever their number; a rank without shards simply yields nothing and still joins the final gather.

Why not `webdataset.WebDataset` here: its tar stream parser caps a worker at ~20-30k samples/s (ENVIRONMENT.md);
the shards stay plain WebDataset tars (tests read them with `webdataset`), only the reader is ours (`tario`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dlscale.data.shards import decode_record, load_manifest
from dlscale.data.tario import CorruptShardError, iter_records

log = logging.getLogger(__name__)
NORMALIZATIONS = ("minmax", "standardize", "log", "none")
EPS = 1e-8


@dataclass
class StreamConfig:
    """How shards become batches."""
    batch_size: int = 64                 # per rank (DeepSpeed's micro batch)
    num_workers: int = 2                 # DataLoader worker processes per rank
    normalize: str = "minmax"            # per image: minmax to [0,1] | standardize | log (log1p above min, then minmax) | none
    augment: bool = True                 # random flips and 90-degree rotations in training (no preferred orientation)
    shuffle_buffer: int = 4096           # samples mixed across records before batching
    strict: bool = False                 # a corrupt training shard/record is fatal instead of skipped and counted
    allow_pipe: bool = False             # allow `pipe:` shard URLs (they run shell commands)
    url_template: str | None = None      # shard location, e.g. "pipe:aws s3 cp s3://bucket/set/{name} -"; default: data dir
    targets: list[str] = field(default_factory=list)   # metadata keys returned as regression targets ("target")

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"data.normalize={self.normalize!r}: expected one of {NORMALIZATIONS}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.batch_size must be >= 1, data.num_workers and data.shuffle_buffer >= 0")


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
        url = self.cfg.url_template.format(name=name) if self.cfg.url_template else str(self.data_dir / name)
        if url.startswith("pipe:") and not self.cfg.allow_pipe:
            raise ValueError(f"shard URL {url!r} runs a shell command; set data.allow_pipe=true to allow it")
        return url

    def open(self, index: int) -> BinaryIO:
        url = self.urls[index]
        if "://" in url or url.startswith("pipe:"):
            from webdataset.gopen import gopen
            return gopen(url, "rb")
        return open(url, "rb", buffering=1 << 20)

    def records(self, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Decoded records of shard `index`: images, labels, ids (shard, record, position), targets or None."""
        name = self.shards[index]["name"]
        targets = self.cfg.targets
        with self.open(index) as stream:
            for r, (key, record) in enumerate(iter_records(stream, name)):
                images, labels, metas = decode_record(record, self.manifest["record_layout"], self.image_shape,
                                                      len(self.manifest["classes"]), f"{name}:{key}", bool(targets))
                ids = np.stack([np.full(len(labels), index), np.full(len(labels), r), np.arange(len(labels))], 1)
                yield (torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(ids),
                       torch.tensor(extract_targets(metas, targets, f"{name}:{key}")) if targets else None)

    def describe(self, ids: torch.Tensor) -> list[str]:
        """Human-readable sample keys ("train-000003.tar:record 5:sample 17") for ids from a batch."""
        return [f"{self.shards[s]['name']}:record {r}:sample {p}" for s, r, p in ids.tolist()]


def extract_targets(metas: list[dict], keys: list[str], where: str) -> np.ndarray:
    try:
        return np.array([[float(m[k]) for k in keys] for m in metas], dtype=np.float32)
    except KeyError as err:
        raise ValueError(f"{where}: sample metadata has no regression target {err}; available: "
                         f"{sorted(metas[0]) if metas else []}") from None


def normalize(images: torch.Tensor, method: str) -> torch.Tensor:
    """Per-image normalisation of a (B,C,H,W) batch (raw physical values stay in the shards)."""
    if method == "none":
        return images
    flat = images.flatten(1)
    if method == "standardize":
        mean, std = flat.mean(1), flat.std(1)
        return ((flat - mean[:, None]) / (std[:, None] + EPS)).view_as(images)
    if method == "log":
        flat = torch.log1p((flat - flat.amin(1, keepdim=True)).clamp_min(0))
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo + EPS)).view_as(images)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply one of the 8 dihedral transforms (flips x 90-degree rotations) per image."""
    choice = torch.randint(0, 8, (len(images),), generator=generator)
    out = images.clone()
    for k in range(1, 8):
        idx = (choice == k).nonzero().flatten()
        if len(idx):
            x = images[idx]
            x = torch.rot90(x, k % 4, dims=(2, 3))
            out[idx] = torch.flip(x, dims=(3,)) if k >= 4 else x
    return out


def _batch(images, labels, ids, targets, cfg: StreamConfig, generator: torch.Generator | None) -> dict:
    images = normalize(images, cfg.normalize)
    if generator is not None and cfg.augment:
        images = augment(images, generator)
    batch = {"image": images.contiguous(), "label": labels, "ids": ids}
    if targets is not None:
        batch["target"] = targets
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Endless resampled stream cut to `batches_per_epoch` batches per rank; call `set_epoch` before each epoch."""

    def __init__(self, shards: ShardSet, rank: int, world: int, batches_per_epoch: int, seed: int = 0):
        self.shards, self.rank, self.world = shards, rank, world
        self.batches_per_epoch, self.seed, self.epoch = batches_per_epoch, seed, 0
        self.max_failures = 10 * len(shards.urls) + 10

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        quota = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        seeds = [self.seed, self.epoch, self.rank, worker]
        rng = np.random.default_rng(seeds)
        gen = torch.Generator().manual_seed(int(np.random.default_rng(seeds + [1]).integers(2**62)))
        cfg = self.shards.cfg
        bs, buffer = cfg.batch_size, max(cfg.shuffle_buffer, cfg.batch_size)
        pending: list[tuple] = []
        held = emitted = skipped = failures = 0
        while emitted < quota:
            index = int(rng.integers(len(self.shards.urls)))
            try:
                for record in self.shards.records(index):
                    pending.append(record)
                    held += len(record[1])
                    failures = 0
                    if held < buffer + bs:
                        continue
                    images, labels, ids, targets = _concat(pending)
                    perm = torch.randperm(held, generator=gen)
                    n_emit = min((held - buffer // 2) // bs, quota - emitted)
                    for b in range(n_emit):
                        take = perm[b * bs:(b + 1) * bs]
                        yield _batch(images[take], labels[take], ids[take],
                                     None if targets is None else targets[take], cfg, gen)
                    emitted += n_emit
                    if emitted >= quota:
                        return
                    rest = perm[n_emit * bs:]
                    pending = [(images[rest], labels[rest], ids[rest], None if targets is None else targets[rest])]
                    held = len(rest)
            except (CorruptShardError, OSError) as err:
                if cfg.strict:
                    raise
                skipped, failures = skipped + 1, failures + 1
                log.warning("skipped a corrupt part of %s (%d skipped so far by rank %d worker %d): %s",
                            self.shards.urls[index], skipped, self.rank, worker, err)
                if failures > self.max_failures:
                    raise RuntimeError(f"{failures} consecutive shard failures in split {self.shards.split!r}; "
                                       f"last: {err}") from err


def _concat(records: list[tuple]) -> tuple:
    images, labels, ids, targets = zip(*records)
    return (torch.cat(images), torch.cat(labels), torch.cat(ids),
            None if targets[0] is None else torch.cat(targets))


class EvalStream(IterableDataset):
    """Every sample of the split exactly once across all ranks and workers, in batches of the configured size."""

    def __init__(self, shards: ShardSet, rank: int, world: int):
        self.shards, self.rank, self.world = shards, rank, world

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world * workers
        bs = self.shards.cfg.batch_size
        pending, held = [], 0
        for index in range(slot, len(self.shards.urls), slots):
            for record in self.shards.records(index):
                pending.append(record)
                held += len(record[1])
                while held >= bs:
                    images, labels, ids, targets = _concat(pending)
                    yield _batch(images[:bs], labels[:bs], ids[:bs], None if targets is None else targets[:bs],
                                 self.shards.cfg, None)
                    pending = [(images[bs:], labels[bs:], ids[bs:], None if targets is None else targets[bs:])]
                    held -= bs
        if held:
            yield _batch(*_concat(pending), self.shards.cfg, None)


def batches_per_epoch(num_samples: int, batch_size: int, world: int) -> int:
    """Batches each rank yields per epoch so that one epoch sees about the split once."""
    return max(1, num_samples // (batch_size * world))


def train_loader(data_dir: Path | str, cfg: StreamConfig, rank: int = 0, world: int = 1, seed: int = 0,
                 split: str = "train", batches: int | None = None) -> DataLoader:
    shards = ShardSet(data_dir, split, cfg)
    n = batches or batches_per_epoch(shards.num_samples, cfg.batch_size, world)
    return _loader(TrainStream(shards, rank, world, n, seed), cfg)


def eval_loader(data_dir: Path | str, cfg: StreamConfig, rank: int = 0, world: int = 1,
                split: str = "val") -> DataLoader:
    return _loader(EvalStream(ShardSet(data_dir, split, cfg), rank, world), cfg)


def _loader(dataset: IterableDataset, cfg: StreamConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
