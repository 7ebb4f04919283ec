"""Per-sample metadata and raw images of a split, in sample-id order (the order of `features.features`).

The downstream tasks need what the training streams do not carry: metadata keys that only some classes have (the
axion mass is None on no_sub and cdm samples, so it cannot be a stream regression target) and the raw images of
the super-resolution task. Both are read straight from the shards, once per split, and sorted by sample id.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from dlscale.data.shards import decode_record
from dlscale.data.shardset import ShardSet
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import resize
from dlscale.data.tario import iter_records


def _records(data_dir, split: str, with_meta: bool):
    shards = ShardSet(data_dir, split, StreamConfig(num_workers=0))
    manifest = shards.manifest
    for index in range(len(shards.urls)):
        name = shards.shards[index]["name"]
        with shards.open(index) as stream:
            for r, (key, record) in enumerate(iter_records(stream, name)):
                images, labels, metas = decode_record(record, manifest["record_layout"], shards.image_shape,
                                                      len(manifest["classes"]), f"{name}:{key}", with_meta)
                ids = np.stack([np.full(len(labels), index), np.full(len(labels), r), np.arange(len(labels))], 1)
                yield images, labels, ids, metas


def _order(ids: np.ndarray) -> np.ndarray:
    return np.lexsort(ids.T[::-1])


def metadata(data_dir, split: str, keys: list[str]) -> dict[str, np.ndarray]:
    """{"ids", "labels", key: float values (NaN where a sample lacks the key or holds None)} in id order."""
    ids, labels, columns = [], [], {k: [] for k in keys}
    for _, record_labels, record_ids, metas in _records(data_dir, split, True):
        ids.append(record_ids)
        labels.append(record_labels)
        for k in keys:
            columns[k].extend(_number(m.get(k)) for m in metas)
    if not ids:
        raise ValueError(f"{data_dir}: the {split} split holds no samples")
    ids = np.concatenate(ids)
    order = _order(ids)
    out = {"ids": ids[order], "labels": np.concatenate(labels)[order]}
    out.update({k: np.asarray(v, dtype=np.float64)[order] for k, v in columns.items()})
    return out


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def images(data_dir, split: str, stream: StreamConfig, limit: int | None = None) -> dict[str, np.ndarray]:
    """{"ids", "labels", "images" (n, C, H, W) float32 at the stream's output size, not normalised}, id order;
    the first `limit` samples by id when given (bounds the super-resolution evaluation on large splits)."""
    ids, labels, pixels = [], [], []
    for record_images, record_labels, record_ids, _ in _records(data_dir, split, False):
        ids.append(record_ids)
        labels.append(record_labels)
        pixels.append(record_images)
    ids = np.concatenate(ids)
    order = _order(ids)[:limit]
    stack = torch.from_numpy(np.concatenate(pixels)[order]).float()
    if stream.resize is not None:
        stack = resize(stack, stream.resize, stream.resize_mode)
    return {"ids": ids[order], "labels": np.concatenate(labels)[order], "images": stack.numpy()}
