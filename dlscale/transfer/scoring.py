"""Probes on frozen features and the metrics of a (method, encoder, N) cell with their confidence intervals.

The classification probe is the library's (`dlscale.metrics.linear_probe`: multinomial logistic regression on
standardised features, same solver and seed), fitted here so that its eval-split probabilities are kept for the
bootstrap; the regression probe is ridge regression on standardised features.

A cell has R repeats (subsets, or seeds at N = all), each scored on the whole eval split. Its value is the mean over
repeats; its 95% CI is the percentile interval of a two-level bootstrap: each draw resamples the repeats (with
replacement) and, once for all of them, the eval samples, and averages the metric over the drawn repeats. It thus
holds both the subset-to-subset spread and the finite eval set. Draws missing a class are skipped and counted.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import r2_score

from dlscale.transfer.bootstrap import weighted_auc
from dlscale.metrics import check_labels, classification_metrics, logistic_probe, regression_metrics, ridge_probe


def probe_classifier(train_features: np.ndarray, train_labels: np.ndarray, eval_features: np.ndarray,
                     class_names: Sequence[str], seed: int = 0) -> np.ndarray:
    """Eval-split class probabilities of `linear_probe`'s model fitted on the given train features."""
    check_labels(train_labels, class_names, "probe train labels")
    return logistic_probe(seed).fit(train_features, train_labels).predict_proba(eval_features)


def probe_regressor(train_features: np.ndarray, train_targets: np.ndarray, eval_features: np.ndarray,
                    alpha: float = 1.0) -> np.ndarray:
    """Eval-split predictions (in the targets' units) of ridge regression on standardised frozen features."""
    probe = ridge_probe(alpha).fit(train_features, train_targets)
    return np.asarray(probe.predict(eval_features)).reshape(len(eval_features), -1)


def repeat_metrics(pred: dict, truth: dict, class_names: Sequence[str], targets: Sequence[str]) -> dict:
    """accuracy, auc_macro (from `classification_metrics`), mae/<t>, r2/<t> of one repeat on the eval split."""
    out: dict[str, float] = {}
    if "probs" in pred:
        cls = classification_metrics(pred["probs"], truth["labels"], class_names, n_bootstrap=0)
        out.update(accuracy=cls["accuracy"], auc_macro=cls["auc_macro"])
    if "regression" in pred:
        out.update(regression_metrics(pred["regression"], truth["target"], targets))
        for j, name in enumerate(targets):
            out[f"r2/{name}"] = float(r2_score(truth["target"][:, j], pred["regression"][:, j]))
    return out


def weighted_metrics(pred: dict, labels: np.ndarray, target: np.ndarray | None, counts: np.ndarray,
                     n_classes: int, targets: Sequence[str]) -> dict[str, np.ndarray]:
    """The metrics of bootstrap draws at once: draw b takes eval sample i `counts[b, i]` times. One-vs-rest AUC is
    the Mann-Whitney statistic on the weighted samples (ties count one half, as in ROC AUC); (B,) per metric."""
    out, n = {}, counts.sum(1)
    if "probs" in pred:
        probs = pred["probs"]
        out["accuracy"] = counts @ (probs.argmax(1) == labels).astype(float) / n
        aucs = [weighted_auc(probs[:, k], labels == k, counts) for k in range(n_classes)]
        out["auc_macro"] = np.mean(aucs, axis=0)
    if "regression" in pred:
        for j, name in enumerate(targets):
            error, truth = pred["regression"][:, j] - target[:, j], target[:, j]
            out[f"mae/{name}"] = counts @ np.abs(error) / n
            mean = counts @ truth / n
            spread = (counts * (truth[None, :] - mean[:, None]) ** 2).sum(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[f"r2/{name}"] = np.where(spread > 0, 1 - counts @ error ** 2 / spread, np.nan)
    return out


def summarize_cell(preds: list[dict], truth: dict, class_names: Sequence[str], targets: Sequence[str] = (),
                   n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """{"repeats": [metrics per repeat], "mean": {...}, "ci_low": {...}, "ci_high": {...}, "ci_skipped": n}."""
    if not preds:
        raise ValueError("summarize_cell: no repeats to summarise")
    labels = np.asarray(truth["labels"])
    target = np.asarray(truth["target"]) if "target" in truth else None
    per_repeat = [repeat_metrics(p, truth, class_names, targets) for p in preds]
    keys = list(per_repeat[0])
    mean = {k: float(np.mean([m[k] for m in per_repeat])) for k in keys}
    rng = np.random.default_rng(seed)
    n_eval, n_classes, draws, skipped = len(labels), len(class_names), {k: [] for k in keys}, 0
    onehot = np.eye(n_classes)[labels]
    chunk = max(1, 2_000_000 // max(n_eval, 1))          # draws per block: bounded memory for large eval sets
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        chosen = rng.integers(0, len(preds), (b, len(preds)))                 # repeats of each draw
        counts = rng.multinomial(n_eval, np.full(n_eval, 1 / n_eval), size=b).astype(float)   # eval samples
        if "probs" in preds[0]:
            keep = (counts @ onehot).min(1) > 0
            skipped += int((~keep).sum())
            chosen, counts = chosen[keep], counts[keep]
        if not len(counts):
            continue
        values = [weighted_metrics(p, labels, target, counts, n_classes, targets) for p in preds]
        rows = np.arange(len(counts))[:, None]
        for k in keys:
            grid = np.stack([v[k] for v in values], axis=1)                   # (draws, repeats)
            draws[k].extend(grid[rows, chosen].mean(1).tolist())
    low = {k: float(np.nanpercentile(v, 2.5)) if v else float("nan") for k, v in draws.items()}
    high = {k: float(np.nanpercentile(v, 97.5)) if v else float("nan") for k, v in draws.items()}
    return {"repeats": per_repeat, "mean": mean, "ci_low": low, "ci_high": high, "ci_skipped": skipped}
