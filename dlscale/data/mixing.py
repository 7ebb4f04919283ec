"""How every writer (pack, simulate, label subsets) spreads the classes of a split over its shards.

A shard is a contiguous run of the order in which a split's samples reach `DatasetWriter` (which then shuffles
inside the shard only), so that order decides what a shard holds. Writers put it in `spread_order`: each class's
samples at even intervals, so any run of consecutive samples, and so every shard, holds each class within 2 samples
of its share (every prefix within 1). A shard of one class would starve a rank, a worker or the linear probe's
train set of the others; a random shuffle only makes that unlikely, and class-sized simulation batches make it sure.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def spread_order(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Indices into `labels` in an order that spreads every class evenly over the sequence, each class's samples
    kept in their given order (shuffle them first for a random pick): the i-th of n_c samples of class c sits at
    (i + 1/2) / n_c of the way, ties in class order."""
    labels = np.asarray(labels, dtype=np.int64)
    where = np.zeros(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        where[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((labels, where))


def add_round(writer, pieces: Sequence[tuple[str, int]],
              batches: Sequence[tuple[np.ndarray, np.ndarray, list[dict]]]) -> None:
    """Hand `writer` one simulation batch of each class, every batch cut into the same `pieces` ((split, count),
    in order), with the classes spread over each piece: the simulators' batches hold one class each, so written as
    they come they would fill shards with class-sized blocks."""
    start = 0
    for split, k in pieces:
        images = np.concatenate([b[0][start:start + k] for b in batches])
        labels = np.concatenate([b[1][start:start + k] for b in batches])
        metas = [meta for b in batches for meta in b[2][start:start + k]]
        order = spread_order(labels)
        writer.add_batch(split, images[order], labels[order], [metas[i] for i in order])
        start += k
