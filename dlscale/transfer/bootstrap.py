"""The two-level bootstrap of any downstream metric, and weighted metrics that score many bootstrap draws at once.

A cell (task, method, encoder, N) has R repeats (label subsets, or seeds), each scored on the same eval samples.
Every task describes its metrics as one function `draw(r, counts) -> {metric: (B,) values}`: the metric of repeat
`r` when eval sample i is taken `counts[b, i]` times. The point value of a repeat is the same function at counts
of one, so the reported number and its interval come from one code path. The interval is the one of
`scoring.summarize_cell` (the classification study): each draw resamples the repeats with replacement and, once
for all of them, the eval samples, and averages the metric over the drawn repeats; draws whose metric is undefined
(NaN, e.g. an AUROC without a positive sample) are skipped and counted.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Draw = Callable[[int, np.ndarray], dict[str, np.ndarray]]


def weighted_auc(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC of `scores` (higher: positive) per draw: the Mann-Whitney statistic on the weighted samples, ties
    counting one half as in scikit-learn's roc_auc_score. counts (B, n) -> (B,); NaN where a side is empty."""
    order = np.argsort(scores, kind="stable")
    score, pos_mask, weight = scores[order], np.asarray(positive, bool)[order], counts[:, order]
    starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])          # groups of tied scores
    pos = np.add.reduceat(weight * pos_mask, starts, axis=1)
    neg = np.add.reduceat(weight * ~pos_mask, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def weighted_mean(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of per-sample `values` under each draw's counts (NaN where a draw holds none of them)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return counts @ values / counts.sum(1)


def weighted_r2(pred: np.ndarray, truth: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Coefficient of determination per draw, as scikit-learn's r2_score on the resampled samples."""
    n = counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = counts @ truth / n
        spread = (counts * (truth[None, :] - mean[:, None]) ** 2).sum(1)
        return np.where(spread > 0, 1 - counts @ (pred - truth) ** 2 / spread, np.nan)


def summarize_draws(draw: Draw, n_repeats: int, n_eval: int, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """{"repeats": [metrics per repeat], "mean", "ci_low", "ci_high", "ci_skipped"} of one cell."""
    if n_repeats < 1 or n_eval < 1:
        raise ValueError(f"summarize_draws: {n_repeats} repeats of {n_eval} eval samples: nothing to summarise")
    per_repeat = [{k: float(v[0]) for k, v in draw(r, np.ones((1, n_eval))).items()} for r in range(n_repeats)]
    keys = list(per_repeat[0])
    mean = {k: float(np.mean([m[k] for m in per_repeat])) for k in keys}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in keys}
    skipped = 0
    chunk = max(1, 2_000_000 // n_eval)              # draws per block: bounded memory for large eval sets
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        chosen = rng.integers(0, n_repeats, (b, n_repeats))
        counts = rng.multinomial(n_eval, np.full(n_eval, 1 / n_eval), size=b).astype(float)
        values = [draw(r, counts) for r in range(n_repeats)]
        rows = np.arange(b)[:, None]
        for k in keys:
            grid = np.stack([v[k] for v in values], axis=1)[rows, chosen].mean(1)
            skipped = max(skipped, int(np.isnan(grid).sum()))
            draws[k].extend(grid[np.isfinite(grid)].tolist())
    low = {k: float(np.percentile(v, 2.5)) if v else float("nan") for k, v in draws.items()}
    high = {k: float(np.percentile(v, 97.5)) if v else float("nan") for k, v in draws.items()}
    return {"repeats": per_repeat, "mean": mean, "ci_low": low, "ci_high": high, "ci_skipped": skipped}
