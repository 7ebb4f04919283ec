"""`dlscale pack`: turn a DeepLense folder into shards + manifest.

Files are read in parallel (`workers` processes), validated (readable, finite, one image shape for the whole set),
assigned to splits (the source's own, plus a stratified validation cut of train when the source has none) and
written through `DatasetWriter` in a seeded order that spreads every class over every shard (`mixed_order`). A bad
file stops the pack with its name and reason and leaves nothing behind, unless `skip_bad`, which leaves it out and
lists it in rejected.json.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dlscale.data.classes import CLASSES, SPLITS
from dlscale.data.deeplense import BadFileError, SourceFile, discover, read_sample
from dlscale.data.mixing import spread_order
from dlscale.data.shards import DatasetWriter, check_output_dir

log = logging.getLogger(__name__)
PROBE_FILES = 32


@dataclass
class PackConfig:
    src: Path
    out: Path
    layout: str = "auto"
    val_fraction: float = 0.1     # of train, per class; used only when the source has no val split
    shard_size: int = 2048        # samples per shard
    samples_per_record: int = 256
    seed: int = 0
    workers: int = 1
    skip_bad: bool = False


def assign_splits(files: list[SourceFile], val_fraction: float, seed: int) -> list[SourceFile]:
    """Keep the source's splits; if it has no val, move a stratified `val_fraction` of train per class to val."""
    if any(f.split == "val" for f in files) or val_fraction == 0:
        return files
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: expected 0 <= F < 1")
    rng = np.random.default_rng(seed)
    out = [f for f in files if f.split != "train"]
    for name in CLASSES:
        train = [f for f in files if f.split == "train" and f.class_name == name]
        n_val = max(1, int(round(val_fraction * len(train)))) if len(train) >= 2 else 0   # tiny sets keep a val
        is_val = np.zeros(len(train), dtype=bool)
        is_val[rng.permutation(len(train))[:n_val]] = True
        out += [SourceFile(f.path, "val" if v else "train", f.class_name) for f, v in zip(train, is_val)]
    return out


def mixed_order(files: list[SourceFile], seed: int) -> list[SourceFile]:
    """The order files are written in: split by split, each class's files in a seeded random order, the classes
    spread evenly over the split (`spread_order`), so every shard holds every class in proportion."""
    rng = np.random.default_rng(seed)
    files = [files[i] for i in rng.permutation(len(files))]
    ordered = []
    for split in SPLITS:
        held = [f for f in files if f.split == split]
        ordered += [held[i] for i in spread_order([CLASSES.index(f.class_name) for f in held])]
    return ordered


def _read(job: tuple[SourceFile, Path]) -> tuple[np.ndarray | None, dict | None, str | None]:
    source, root = job
    try:
        image, meta = read_sample(source, root)
        return image, meta, None
    except BadFileError as err:
        return None, None, str(err)


def probe_shape(files: list[SourceFile], root: Path) -> tuple[int, ...]:
    """The image shape of the set: the most common shape among up to PROBE_FILES files spread over the list."""
    picks = np.unique(np.linspace(0, len(files) - 1, min(PROBE_FILES, len(files))).astype(int))
    shapes = Counter(image.shape for image, _, _ in map(_read, ((files[i], root) for i in picks)) if image is not None)
    if not shapes:
        raise ValueError(f"{root}: none of {len(picks)} probed files could be read; first: {files[picks[0]].path}")
    return shapes.most_common(1)[0][0]


def pack(cfg: PackConfig, progress: bool = True) -> dict:
    """Pack `cfg.src` into `cfg.out`; return the manifest."""
    src = Path(cfg.src)
    check_output_dir(Path(cfg.out))
    layout, files, ignored = discover(src, cfg.layout)
    if ignored:
        log.warning("ignored %d files without the .npy suffix in %s", ignored, src)
    files = assign_splits(files, cfg.val_fraction, cfg.seed)
    shape = probe_shape(files, src)
    files = mixed_order(files, cfg.seed)
    log.info("packing %d files (%s layout, images %s) from %s", len(files), layout, shape, src)
    source = {"kind": "deeplense", "layout": layout, "path": str(src.resolve()), "seed": cfg.seed,
              "val_fraction": cfg.val_fraction}
    writer = DatasetWriter(cfg.out, shape, source, cfg.shard_size, cfg.samples_per_record, cfg.seed)
    jobs = [(f, src) for f in files]
    with writer, _readers(cfg.workers) as pool:
        results = pool.map(_read, jobs, chunksize=16) if pool else map(_read, jobs)
        for source_file, (image, meta, error) in tqdm(zip(files, results), total=len(files), desc="pack",
                                                      unit="file", disable=not progress):
            if error is None and image.shape != shape:
                error = f"{source_file.path}: image shape {image.shape}, expected {shape} like the rest of the set"
            if error is None:
                writer.add(source_file.split, image, CLASSES.index(source_file.class_name), meta)
            elif cfg.skip_bad:
                writer.reject(str(source_file.path), error)
            else:
                raise BadFileError(f"{error}\n(nothing was written; pass --skip-bad to leave bad files out and "
                                   "list them in rejected.json)")
    if writer.rejected:
        log.warning("left out %d bad files, listed with reasons in %s", len(writer.rejected),
                    Path(cfg.out) / "rejected.json")
    return writer.manifest


def _readers(workers: int) -> ProcessPoolExecutor | contextlib.nullcontext:
    """Reader processes for `workers > 1`; a dead worker raises BrokenProcessPool instead of hanging."""
    if workers > 1:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return contextlib.nullcontext()
