"""The linear probe's train set: stratified, a pure function of the dataset and `eval.probe_samples`.

`probe_samples` is split evenly over the classes (the remainder to the first ones); the set is the first that many
train samples of each class in id order, so it holds every class in proportion whatever the order of the shards,
and the same samples whatever the ranks and DataLoader workers (features are gathered in id order before the pick).
`probe_samples` at or above the train split's size takes the whole split. A class with fewer train samples than its
share is refused before the run starts (`check_probe_set`), naming the class and the numbers.
"""
from __future__ import annotations

import numpy as np

from dlscale.data.stream import leading_shards


def probe_quota(probe_samples: int, class_counts: dict[str, int]) -> dict[str, int] | None:
    """{class: train samples the probe takes}, or None for the whole split (`probe_samples` >= its size)."""
    if probe_samples >= sum(class_counts.values()):
        return None
    share, extra = divmod(probe_samples, len(class_counts))
    return {c: share + (k < extra) for k, c in enumerate(class_counts)}


def check_probe_set(probe_samples: int, class_counts: dict[str, int], where: str) -> None:
    """Every class holds its share of the probe's train set (`class_counts`: the train split's, from the manifest
    of `where`), or a ValueError naming the class, its count and the `eval.probe_samples` the split allows."""
    if probe_samples <= 0:
        return
    if probe_samples < len(class_counts):
        raise ValueError(f"eval.probe_samples={probe_samples}: the linear probe needs a train sample of each of the "
                         f"{len(class_counts)} classes; set it >= {len(class_counts)}, or 0 for no probe")
    absent = [c for c, n in class_counts.items() if n == 0]
    if absent:
        raise ValueError(f"the train split of {where} holds no sample of class {absent[0]!r} (per class: "
                         f"{class_counts}): the linear probe needs every class; set eval.probe_samples=0 for no probe")
    total, fits = sum(class_counts.values()), len(class_counts) * min(class_counts.values())
    for c, n in (probe_quota(probe_samples, class_counts) or {}).items():
        if class_counts[c] < n:
            raise ValueError(f"eval.probe_samples={probe_samples} takes the first {n} train samples of class {c!r} "
                             f"(an even share per class), but the train split of {where} holds {class_counts[c]} "
                             f"(per class: {class_counts}); set eval.probe_samples <= {fits}, or >= {total} for the "
                             "whole split, or 0 for no probe")


def probe_shard_count(shards: list[dict], classes: list[str], quota: dict[str, int] | None) -> int:
    """How many leading train shards (manifest entries) hold every class's share: from their per-shard class counts;
    all of them for the whole split or where a manifest predates per-shard counts."""
    if quota is None or any("class_counts" not in s for s in shards):
        return len(shards)
    return max(leading_shards([{"samples": s["class_counts"].get(c, 0)} for s in shards], quota[c])
               for c in classes)


def pick_probe_rows(labels: np.ndarray, classes: list[str], quota: dict[str, int] | None) -> np.ndarray:
    """Rows of the probe's train set among train samples gathered in id order (`labels`), in id order."""
    if quota is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == k)[:quota[c]] for k, c in enumerate(classes)]))
