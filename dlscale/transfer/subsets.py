"""Labelled subsets of the train split: stratified, seeded and nested, written as small shard datasets.

For repeat `r`, each class's train samples are put in one random order (seeded by (seed, r)); the subset of N labels
per class is the first N of every class's order, so the 10 lie inside the 100, which lie inside the 1000. Only the
train split is ever drawn from; evaluation uses the whole eval split, which no subset touches.

Why a dataset and not a stream filter: the subset then trains through the unchanged DeepSpeed engine, its manifest
counts are exact (an epoch is the subset, not the split with most samples skipped), and at N <= 1000 per class it
costs two reads of the train split per repeat (the labels, then the samples). The subset's train shards are written
with `DatasetWriter` (the source's record layout, its metadata kept, so regression targets come along), its classes
spread over them as by every writer; the eval split's shards are hard links of the source's (copies across
filesystems), under their plain `<split>-NNNNNN.tar` names. The directory is built as a hidden `.NAME.partial-PID`
sibling and renamed into place, so it is complete or absent.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from dlscale import io
from dlscale.data.classes import CLASSES
from dlscale.data.mixing import spread_order
from dlscale.data.partial import partial_dir, remove_stale_partials
from dlscale.data.shards import MANIFEST, DatasetWriter, decode_record, load_manifest
from dlscale.data.shardset import ShardSet
from dlscale.data.stream_config import StreamConfig
from dlscale.data.tario import iter_records

log = logging.getLogger(__name__)
ALL = "all"
COPY_WINDOW_BYTES = 1 << 30
"""Image bytes a copy holds at once (samples are written in an order that no single read of the source gives)."""


def train_index(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, 3) as the streams report them, labels (N,)) of every train sample, ordered by id."""
    shards = ShardSet(data_dir, "train", StreamConfig(num_workers=0))
    ids, labels = [], []
    for index in range(len(shards.urls)):
        for _, record_labels, record_ids, _ in shards.records(index):
            ids.append(record_ids.numpy())
            labels.append(record_labels.numpy())
    if not ids:
        raise ValueError(f"{data_dir}: the train split holds no samples")
    ids, labels = np.concatenate(ids), np.concatenate(labels)
    order = np.lexsort(ids.T[::-1])
    return ids[order], labels[order]


def parse_sizes(text: str) -> list[int | str]:
    """`10,100,1000,all` -> [10, 100, 1000, "all"] (ascending, each once)."""
    sizes: list[int | str] = []
    for item in (part.strip() for part in text.split(",")):
        if item == ALL:
            sizes.append(ALL)
        elif item.isdigit() and int(item) > 0:
            sizes.append(int(item))
        else:
            raise ValueError(f"--labels-per-class {text!r}: {item!r} is neither a count >= 1 nor 'all'")
    numbers = sorted(set(s for s in sizes if s != ALL))
    return numbers + ([ALL] if ALL in sizes else [])


def check_sizes(sizes: Sequence[int | str], labels: np.ndarray, data_dir: str | Path) -> None:
    """Every N must be available in every class of the train split."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    for n in sizes:
        if n != ALL and n > counts.min():
            short = CLASSES[int(counts.argmin())]
            raise ValueError(f"--labels-per-class {n}: the train split of {data_dir} has only {counts.min()} "
                             f"samples of class {short!r} (per class: {dict(zip(CLASSES, counts.tolist()))})")


def nested_subsets(labels: np.ndarray, sizes: Sequence[int | str], seed: int, repeat: int) -> dict:
    """{N: sorted indices into `labels`} with exactly N per class (all samples for "all"), nested in N."""
    rng = np.random.default_rng([seed, repeat])
    orders = [rng.permutation(np.flatnonzero(labels == k)) for k in range(len(CLASSES))]
    return {n: np.arange(len(labels)) if n == ALL else np.sort(np.concatenate([o[:n] for o in orders]))
            for n in sizes}


def subset_name(n: int | str, repeat: int) -> str:
    return f"n{n}-r{repeat}"


def write_subset(data_dir: str | Path, ids: np.ndarray, out_dir: str | Path, eval_split: str,
                 provenance: dict) -> Path:
    """A dataset at `out_dir`: the train samples `ids` (with their metadata) and `data_dir`'s `eval_split`."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    if eval_split not in manifest["splits"]:
        raise ValueError(f"{data_dir}: no {eval_split!r} split to evaluate on (has {', '.join(manifest['splits'])})")

    def link_eval(staging: Path) -> None:
        for shard in manifest["splits"][eval_split]["shards"]:
            _link(data_dir / shard["name"], staging / shard["name"])
        written = io.read_json(staging / MANIFEST)
        written["splits"][eval_split] = copy.deepcopy(manifest["splits"][eval_split])
        io.write_json(staging / MANIFEST, written)
    return _staged(data_dir, manifest, Path(out_dir), provenance,
                   lambda writer: _copy_samples(data_dir, manifest, "train", ids, writer), link_eval)


def write_samples(data_dir: str | Path, chosen: dict[str, np.ndarray], out_dir: str | Path, provenance: dict,
                  extra_meta=None) -> Path:
    """A dataset at `out_dir` holding, per split, only the samples `chosen[split]` (ids of `data_dir`'s split),
    their metadata updated with `extra_meta(split, id) -> dict`. Why copies and not links: a regression run needs its
    target on every sample of both splits (the axion mass exists on axion images only, log10 of it on none)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)

    def fill(writer: DatasetWriter) -> None:
        for split, ids in chosen.items():
            _copy_samples(data_dir, manifest, split, ids, writer, extra_meta)
    return _staged(data_dir, manifest, Path(out_dir), provenance, fill)


def _staged(data_dir: Path, manifest: dict, out_dir: Path, provenance: dict, fill, after=None) -> Path:
    """Build the dataset in a hidden sibling (`fill(writer)`, then `after(staging)` once the writer finished) and
    rename it into place: complete or absent."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir.parent)
    staging = partial_dir(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    layout = manifest["record_layout"]
    source = {"kind": "label_subset", "of": str(data_dir), "split": "train", **provenance,
              "source": manifest.get("source")}
    try:
        with DatasetWriter(staging, tuple(manifest["image_shape"]), source,
                           samples_per_record=layout["samples_per_record"],
                           classes=tuple(manifest["classes"])) as writer:
            fill(writer)
        if after is not None:
            after(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _copy_samples(data_dir: Path, manifest: dict, split: str, ids: np.ndarray, writer: DatasetWriter,
                  extra_meta=None) -> None:
    """Copy the samples `ids` of `split` with their classes spread over the copy's shards (`spread_order`, each
    class in id order): one read of their records for the labels, then one per window of that order that fits in
    COPY_WINDOW_BYTES (a single one for any label subset), so memory stays bounded whatever the source's order."""
    shards = ShardSet(data_dir, split, StreamConfig(num_workers=0))
    ids = sorted(tuple(i) for i in np.asarray(ids).tolist())
    labels = {key: label for key, _, label, _ in _read_samples(shards, manifest, ids)}
    if len(labels) != len(ids):
        raise RuntimeError(f"{data_dir}: found {len(labels)} of the {len(ids)} subset samples in the {split} shards")
    order = [ids[i] for i in spread_order([labels[key] for key in ids])]
    window = max(1, COPY_WINDOW_BYTES // (4 * int(np.prod(manifest["image_shape"]))))
    for start in range(0, len(order), window):
        keys = order[start:start + window]
        held = {key: (image, meta) for key, image, _, meta in _read_samples(shards, manifest, keys)}
        for key in keys:
            image, meta = held[key]
            writer.add(split, image, labels[key], meta if extra_meta is None else {**meta, **extra_meta(split, key)})


def _read_samples(shards: ShardSet, manifest: dict, ids: list[tuple[int, int, int]]
                  ) -> Iterator[tuple[tuple[int, int, int], np.ndarray, int, dict]]:
    """(id, image, label, metadata) of the samples `ids`, in the order of their records on disk; each image a copy
    (a view would keep its whole record alive)."""
    wanted: dict[tuple[int, int], list[int]] = {}
    for shard, record, position in sorted(ids):
        wanted.setdefault((shard, record), []).append(position)
    for index in sorted({shard for shard, _ in wanted}):
        name = shards.shards[index]["name"]
        with shards.open(index) as stream:
            for r, (key, record) in enumerate(iter_records(stream, name)):
                positions = wanted.get((index, r))
                if not positions:
                    continue
                images, labels, metas = decode_record(record, manifest["record_layout"], manifest["image_shape"],
                                                      len(manifest["classes"]), f"{name}:{key}")
                for p in positions:
                    yield (index, r, p), images[p].copy(), int(labels[p]), metas[p]


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:          # another filesystem, or links not allowed: a copy holds the same bytes
        shutil.copyfile(src, dst)


def is_subset(where: Path, data_dir: str, split: str, provenance: dict) -> bool:
    """`where` is a finished subset dataset of `data_dir` with this provenance (so it is reused)."""
    try:
        manifest = load_manifest(where)
    except (FileNotFoundError, ValueError):
        return False
    source = manifest.get("source") or {}
    return split in manifest["splits"] and source.get("of") == str(data_dir) and \
        all(source.get(k) == v for k, v in provenance.items())
