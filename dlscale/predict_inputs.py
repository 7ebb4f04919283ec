"""What `dlscale predict` reads: the images of a source, cut into work items, read by DataLoader workers.

A source is a shard dataset (its `manifest.json`; one or every split), a folder in any layout `dlscale pack` reads
(common test, Models I-III with pickled axion pairs, Model IV), a folder of bare .npy files, one .npy file or a
glob. Files go through the same reader as `dlscale pack` (`dlscale.data.deeplense.load_npy`: plain arrays never
unpickled, object arrays through the restricted unpickler), so a malicious pickle is refused before any of it runs.

Work items are fixed before anything is read: `batch_size` consecutive files, or one shard (its samples cut in
batches of `batch_size` as `EvalStream` does). Item i goes to worker slot i mod (world x workers), and every row
carries the key (item, record, position) that `gather` sorts by. So which images share a batch, and the order of
the output, never depend on the number of ranks or workers: the outputs are bitwise the same on 1 rank or 8.

A file that cannot be scored (unreadable, refused pickle, NaN/Inf pixels, wrong shape) is not raised inside the
worker: it travels in its batch's `rejected` list, and the caller stops the run naming it (or, with `--skip-bad`,
lists it in rejected.json). Every rank then still reaches the final gather; no rank waits forever.
"""
from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from dlscale.data.deeplense import BadFileError, discover, load_npy, split_image_and_mass, to_chw
from dlscale.data.shards import load_manifest
from dlscale.data.records import worker_share
from dlscale.data.shardset import ShardSet
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import normalize
from dlscale.data.tario import CorruptShardError

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Item:
    """One unit of work: a run of files, or one shard of a split."""
    files: tuple[str, ...] = ()
    split: str | None = None
    shard: int | None = None

    def size(self, shards: dict[str, ShardSet]) -> int:
        return len(self.files) if self.shard is None else shards[self.split].shards[self.shard]["samples"]


@dataclass(frozen=True)
class Preprocess:
    """How a stored image becomes the model's input: the run's image shape and normalisation, and whether an image
    of another size is resized (`--resize`, with the run's resize mode) or refused."""
    image_shape: tuple[int, int, int]
    normalize: str
    resize: bool = False
    resize_mode: str = "interpolate"


def is_shard_dataset(src: Path) -> bool:
    return src.is_dir() and (src / "manifest.json").is_file()


def list_files(src: str, layout: str = "auto") -> list[str]:
    """The .npy files of `src` in a fixed order: a glob's sorted matches, one file, a folder of bare .npy files, or
    a DeepLense folder in any layout `dlscale pack` reads (in `discover`'s order)."""
    if any(c in src for c in GLOB_CHARS) and not Path(src).exists():
        files = sorted(p for p in glob.glob(src, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"{src}: the pattern matches no file")
        return files
    path = Path(src)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{src}: no such file, folder or matching pattern")
    if not any(p.is_dir() for p in path.iterdir()):
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix == ".npy")
        if not files:
            raise ValueError(f"{src}: no .npy files in this folder")
        return files
    return [str(f.path) for f in discover(path, layout)[1]]


def file_items(files: list[str], batch_size: int) -> list[Item]:
    return [Item(files=tuple(files[i:i + batch_size])) for i in range(0, len(files), batch_size)]


def shard_items(shards: dict[str, ShardSet]) -> list[Item]:
    return [Item(split=split, shard=i) for split, s in shards.items() for i in range(len(s.urls))]


def open_shards(data_dir: Path, split: str | None, batch_size: int) -> dict[str, ShardSet]:
    """The ShardSets to read: `split`, or every split of the manifest in its order."""
    cfg = StreamConfig(batch_size=batch_size, num_workers=0, augment=False)
    first = ShardSet(data_dir, split or next(iter(_splits(data_dir))), cfg)
    splits = [split] if split else list(first.manifest["splits"])
    return {s: first if s == first.split else ShardSet(data_dir, s, cfg) for s in splits}


def _splits(data_dir: Path) -> list[str]:
    splits = list(load_manifest(data_dir)["splits"])
    if not splits:
        raise ValueError(f"{data_dir}: the manifest lists no split")
    return splits


def read_image(path: str, prep: Preprocess) -> torch.Tensor:
    """One file as the model's float32 (C, H, W) input before normalisation; BadFileError names the file."""
    image, _ = split_image_and_mass(load_npy(Path(path)), Path(path))
    return fit_shape(torch.from_numpy(to_chw(image, Path(path))), prep, path)


def fit_shape(image: torch.Tensor, prep: Preprocess, where: str) -> torch.Tensor:
    """`image` (C, H, W) at the run's image shape: as it is, resized with `--resize`, else refused."""
    channels, height, width = prep.image_shape
    if tuple(image.shape) == prep.image_shape:
        return image
    if image.shape[0] != channels:
        raise BadFileError(f"{where}: image shape {tuple(image.shape)}, the model takes {channels} channel(s) "
                           f"({list(prep.image_shape)})")
    if not prep.resize:
        raise BadFileError(f"{where}: image size {tuple(image.shape[1:])}, the model expects {height}x{width} "
                           f"(image shape {list(prep.image_shape)}); pass --resize to resize images to it")
    batch = image[None]
    h, w = image.shape[1:]
    if prep.resize_mode == "crop" and h >= height and w >= width:
        top, left = (h - height) // 2, (w - width) // 2
        return batch[0, :, top:top + height, left:left + width].contiguous()
    return torch.nn.functional.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False,
                                           antialias=True)[0]


class PredictStream(IterableDataset):
    """Batches of this rank's items: `image` (normalised), `keys` (B, 3) = (item, record, position), `sources`
    (file paths or shard keys) and `rejected` [(source, reason)] of what could not be scored."""

    def __init__(self, items: list[Item], shards: dict[str, ShardSet], prep: Preprocess, batch_size: int,
                 rank: int, world: int):
        self.items, self.shards, self.prep, self.batch_size = items, shards, prep, batch_size
        self.rank, self.world = rank, world

    def rank_items(self, workers: int) -> list[Item]:
        """The items this rank's workers read (for the progress bar): item i -> slot i mod (world x workers)."""
        workers = max(workers, 1)
        return [item for i, item in enumerate(self.items) if (i % (self.world * workers)) // workers == self.rank]

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_share()
        slot, slots = self.rank * workers + worker, self.world * workers
        for index in range(slot, len(self.items), slots):
            item = self.items[index]
            if item.shard is None:
                yield self._file_batch(index, item.files)
            else:
                yield from self._shard_batches(index, item)

    def _file_batch(self, index: int, files: tuple[str, ...]) -> dict:
        images, keys, sources, rejected = [], [], [], []
        for position, path in enumerate(files):
            try:
                images.append(read_image(path, self.prep))
            except BadFileError as err:
                rejected.append((path, str(err)))
                continue
            keys.append((index, 0, position))
            sources.append(path)
        return self._batch(images, keys, sources, rejected)

    def _shard_batches(self, index: int, item: Item) -> Iterator[dict]:
        shards = self.shards[item.split]
        pending: list[tuple[torch.Tensor, tuple[int, int, int], str]] = []
        rejected: list[tuple[str, str]] = []
        try:
            for record, (images, _, ids, _) in enumerate(shards.records(item.shard)):
                for position, (image, key) in enumerate(zip(images, shards.describe(ids))):
                    try:
                        pending.append((self._finite(fit_shape(image, self.prep, key), key),
                                        (index, record, position), key))
                    except BadFileError as err:
                        rejected.append((key, str(err)))
                while len(pending) >= self.batch_size:
                    chunk, pending = pending[:self.batch_size], pending[self.batch_size:]
                    yield self._batch(*map(list, zip(*chunk)), rejected)
                    rejected = []
        except (CorruptShardError, OSError) as err:
            rejected.append((shards.shards[item.shard]["name"], f"{shards.urls[item.shard]}: {err}"))
        if pending or rejected:
            yield self._batch(*(map(list, zip(*pending)) if pending else ([], [], [])), rejected)

    @staticmethod
    def _finite(image: torch.Tensor, key: str) -> torch.Tensor:
        if not torch.isfinite(image).all():
            raise BadFileError(f"{key}: {int((~torch.isfinite(image)).sum())} NaN/Inf pixels")
        return image

    def _batch(self, images: list, keys: list, sources: list, rejected: list) -> dict:
        stacked = torch.stack(images) if images else torch.empty((0, *self.prep.image_shape))
        return {"image": normalize(stacked, self.prep.normalize, inplace=True),
                "keys": torch.tensor(keys, dtype=torch.int64).reshape(-1, 3), "sources": sources,
                "rejected": rejected}
