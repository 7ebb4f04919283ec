"""Probes on frozen features and the metrics of a (method, encoder, N) cell with their confidence intervals.

The classification probe is the library's (`dlscale.evaluate.linear_probe`: multinomial logistic regression on
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
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dlscale.evaluate import check_labels, classification_metrics, regression_metrics


def probe_classifier(train_features: np.ndarray, train_labels: np.ndarray, eval_features: np.ndarray,
                     class_names: Sequence[str], seed: int = 0) -> np.ndarray:
    """Eval-split class probabilities of `linear_probe`'s model fitted on the given train features."""
    check_labels(train_labels, class_names, "probe train labels")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_features, train_labels)
    return probe.predict_proba(eval_features)


def probe_regressor(train_features: np.ndarray, train_targets: np.ndarray, eval_features: np.ndarray,
                    alpha: float = 1.0) -> np.ndarray:
    """Eval-split predictions (in the targets' units) of ridge regression on standardised frozen features."""
    probe = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    probe.fit(train_features, train_targets)
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


def _fast_metrics(pred: dict, labels: np.ndarray, target: np.ndarray | None, n_classes: int,
                  targets: Sequence[str]) -> dict[str, float]:
    """The same metrics for bootstrap draws: one-vs-rest AUC as the Mann-Whitney rank statistic (ties count one
    half, as in ROC AUC), no input checks."""
    out = {}
    if "probs" in pred:
        probs = pred["probs"]
        out["accuracy"] = float((probs.argmax(1) == labels).mean())
        aucs = []
        for k in range(n_classes):
            positive = labels == k
            n_pos, n_neg = int(positive.sum()), int((~positive).sum())
            ranks = rankdata(probs[:, k])
            aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        out["auc_macro"] = float(np.mean(aucs))
    if "regression" in pred:
        reg = pred["regression"]
        for j, name in enumerate(targets):
            error = reg[:, j] - target[:, j]
            out[f"mae/{name}"] = float(np.abs(error).mean())
            spread = ((target[:, j] - target[:, j].mean()) ** 2).sum()
            out[f"r2/{name}"] = float(1 - (error ** 2).sum() / spread) if spread > 0 else float("nan")
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
    n_classes, draws, skipped = len(class_names), {k: [] for k in keys}, 0
    for _ in range(n_bootstrap):
        chosen = rng.integers(0, len(preds), len(preds))
        index = rng.integers(0, len(labels), len(labels))
        if "probs" in preds[0] and np.bincount(labels[index], minlength=n_classes).min() == 0:
            skipped += 1
            continue
        sub = {r: _fast_metrics({k: v[index] for k, v in preds[r].items()}, labels[index],
                                None if target is None else target[index], n_classes, targets)
               for r in set(chosen.tolist())}
        for k in keys:
            draws[k].append(np.mean([sub[r][k] for r in chosen]))
    low = {k: float(np.nanpercentile(v, 2.5)) if v else float("nan") for k, v in draws.items()}
    high = {k: float(np.nanpercentile(v, 97.5)) if v else float("nan") for k, v in draws.items()}
    return {"repeats": per_repeat, "mean": mean, "ci_low": low, "ci_high": high, "ci_skipped": skipped}
