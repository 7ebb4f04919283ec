"""Evaluation metrics on gathered scores: classification (accuracy, ROC AUC with a bootstrap CI, ECE and a softmax
temperature), regression, and linear probes on frozen features.

Functions take numpy arrays already gathered from every rank; metric names are the flat keys the engine logs
(without the `val/` or `probe/` prefix, which the caller adds). Values are plain Python numbers and
lists, ready for metrics.json and TensorBoard.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def check_labels(labels: np.ndarray, class_names: Sequence[str], what: str = "labels") -> np.ndarray:
    """Validate (N,) integer class indices in [0, K) where every class occurs (else ROC AUC is undefined)."""
    labels = np.asarray(labels)
    n_classes = len(class_names)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D array of integer class indices, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{what} must lie in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]")
    absent = [name for k, name in enumerate(class_names) if not (labels == k).any()]
    if absent:
        raise ValueError(f"{what}: classes {absent} have no samples")
    return labels


def check_scores(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, K) finite class scores against (N,) labels (see `check_labels`)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    n_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != labels.shape[:1] + (n_classes,):
        raise ValueError(f"expected probs (N, {n_classes}) and labels (N,) for classes {list(class_names)}, "
                         f"got probs {probs.shape} and labels {labels.shape}")
    if not np.isfinite(probs).all():
        raise ValueError(f"probs contain {int((~np.isfinite(probs)).sum())} non-finite values")
    return probs, check_labels(labels, class_names)


def one_vs_rest_aucs(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class one-vs-rest ROC AUC; scores need not be normalised (logits work as well as probabilities)."""
    onehot = np.eye(probs.shape[1], dtype=int)[labels]
    return np.asarray(roc_auc_score(onehot, probs, average=None))


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, object]:
    """Accuracy, macro / micro / per-class one-vs-rest ROC AUC, confusion matrix, and a bootstrap 95% CI of the
    macro AUC (percentiles over `n_bootstrap` resamples of the samples; resamples lacking a class are skipped and
    counted in `auc_macro_ci_skipped`; the CI is NaN when none is left).
    """
    probs, labels = check_scores(probs, labels, class_names)
    n_classes = len(class_names)
    onehot = np.eye(n_classes, dtype=int)[labels]
    predicted = probs.argmax(axis=1)
    per_class = one_vs_rest_aucs(probs, labels)

    rng = np.random.default_rng(seed)
    resampled_aucs, skipped = [], 0
    for _ in range(n_bootstrap):
        index = rng.integers(0, len(labels), len(labels))
        if np.bincount(labels[index], minlength=n_classes).min() == 0:
            skipped += 1
            continue
        resampled_aucs.append(one_vs_rest_aucs(probs[index], labels[index]).mean())
    ci_low, ci_high = np.percentile(resampled_aucs, [2.5, 97.5]) if resampled_aucs else (np.nan, np.nan)

    return {
        "accuracy": float((predicted == labels).mean()),
        "ece": expected_calibration_error(probs, labels),
        "auc_macro": float(per_class.mean()),
        "auc_micro": float(roc_auc_score(onehot, probs, average="micro")),
        **{f"auc/{name}": float(auc) for name, auc in zip(class_names, per_class)},
        "auc_macro_ci_low": float(ci_low),
        "auc_macro_ci_high": float(ci_high),
        "auc_macro_ci_skipped": skipped,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=range(n_classes)).tolist(),
        "n_samples": int(len(labels)),
    }


ECE_BINS = 15
PER_IMAGE_MEANS = ("recon_mse", "mae_masked_mse", "psnr", "ssim", "psnr_bicubic", "ssim_bicubic")
"""Per-image scores an evaluation reports as their mean over the split (`<prefix>/<key>`)."""


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Samples, mean confidence (max probability) and accuracy of the argmax per equal-width confidence bin
    ((k/n, (k+1)/n], the first bin closed at 0); empty bins hold count 0 and NaN means."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "confidence": np.bincount(index, confidence, n_bins) / count,
                "accuracy": np.bincount(index, correct, n_bins) / count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the sample-weighted mean |accuracy - confidence| over equal-width bins of the max probability."""
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((gap * bins["count"][filled]).sum() / bins["count"].sum())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(log(probs) / T) (Guo et al. 2017), by a
    bounded scalar search over log T; fitted on a calibration split, never on the split it is then scored on."""
    from scipy.optimize import minimize_scalar
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))
    labels = np.asarray(labels)

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]).mean())
    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class)."""
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature), row by row."""
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def regression_metrics(pred: np.ndarray, target: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Mean absolute error per regression target (`mae/<name>`), in the target's own units."""
    pred, target = np.asarray(pred, dtype=float), np.asarray(target, dtype=float)
    if pred.ndim == 1:
        pred, target = pred[:, None], target.reshape(-1, 1)
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != len(names):
        raise ValueError(f"expected pred and target (N, {len(names)}) for targets {list(names)}, "
                         f"got {pred.shape} and {target.shape}")
    mae = np.abs(pred - target).mean(axis=0)
    return {f"mae/{name}": float(value) for name, value in zip(names, mae)}


def logistic_probe(seed: int = 0):
    """The linear probe's model, unfitted: multinomial logistic regression on standardised features (lbfgs fits the
    softmax model for K > 2 classes, scikit-learn's default since 1.5). The one definition every probe uses."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


def ridge_probe(alpha: float = 1.0):
    """The regression probe's model, unfitted: ridge regression on standardised features, targets in their units.
    The one definition every regression probe uses (the transfer study's, and LP-FT's starting regression head)."""
    return make_pipeline(StandardScaler(), Ridge(alpha=alpha))


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    class_names: Sequence[str],
    seed: int = 0,
) -> dict[str, float]:
    """Fit a multinomial logistic regression on standardised frozen features; return its eval `accuracy` and
    `auc_macro` (the caller prefixes `probe/`). Measures how linearly the encoder separates the classes.
    """
    train_features, eval_features = np.asarray(train_features), np.asarray(eval_features)
    train_labels = check_labels(train_labels, class_names, "train_labels")
    if train_features.ndim != 2 or len(train_features) != len(train_labels):
        raise ValueError(f"train_features must be (N, D) with N = {len(train_labels)} labels, "
                         f"got {train_features.shape}")
    if eval_features.ndim != 2 or eval_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"eval_features must be (M, {train_features.shape[1]}), got {eval_features.shape}")
    probe = logistic_probe(seed).fit(train_features, train_labels)
    probs, labels = check_scores(probe.predict_proba(eval_features), eval_labels, class_names)
    return {
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "auc_macro": float(one_vs_rest_aucs(probs, labels).mean()),
    }


def summarize(scores: dict[str, np.ndarray], probe_train: dict[str, np.ndarray] | None, class_names: Sequence[str],
              prefix: str = "val", target_names: Sequence[str] = (), n_bootstrap: int = 200,
              seed: int = 0) -> dict[str, object]:
    """Flat metrics from gathered scores: `<prefix>/accuracy`, `<prefix>/auc_*`, `<prefix>/recon_mse`,
    `<prefix>/mae_masked_mse`, `<prefix>/psnr` (and the other `PER_IMAGE_MEANS`), `<prefix>/mae/<target>`,
    `probe/accuracy`, `probe/auc_macro`, `<prefix>/n_samples`."""
    metrics: dict[str, object] = {f"{prefix}/n_samples": int(len(scores["labels"]))}
    if "probs" in scores:
        cls = classification_metrics(scores["probs"], scores["labels"], class_names, n_bootstrap, seed)
        metrics.update({f"{prefix}/{k}": v for k, v in cls.items() if k != "n_samples"})
    for key in PER_IMAGE_MEANS:                      # per-image errors and scores: their mean over the split
        if key in scores:
            metrics[f"{prefix}/{key}"] = float(scores[key].mean())
    if "regression" in scores:
        metrics.update({f"{prefix}/{k}": v for k, v in
                        regression_metrics(scores["regression"], scores["target"], target_names).items()})
    if probe_train is not None:
        probe = linear_probe(probe_train["features"], probe_train["labels"], scores["features"], scores["labels"],
                             class_names, seed)
        metrics.update({f"probe/{k}": v for k, v in probe.items()})
    return metrics


def gap_closed(probs: dict[str, np.ndarray], labels: np.ndarray, baseline: str, upper: str, n_bootstrap: int = 1000,
               seed: int = 0) -> dict[str, dict[str, float]]:
    """The share of the macro-AUC gap between `baseline` (e.g. source-only) and `upper` (target-supervised) that
    each other method closes on the same labelled images: (AUC_m - AUC_base) / (AUC_up - AUC_base), with a paired
    bootstrap 95% CI (one resample of the images scores every method). `probs`: method -> (N, K) scores of the same
    N images in the same order. Also each method's macro AUC and its CI, and the gap itself."""
    labels = np.asarray(labels)
    for name in (baseline, upper):
        if name not in probs:
            raise ValueError(f"gap_closed: no scores for {name!r} (have {', '.join(probs)})")
    rng = np.random.default_rng(seed)
    point = {m: float(one_vs_rest_aucs(p, labels).mean()) for m, p in probs.items()}
    draws: dict[str, list[float]] = {m: [] for m in probs}
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) < probs[baseline].shape[1]:
            continue
        for m, p in probs.items():
            draws[m].append(float(one_vs_rest_aucs(p[idx], labels[idx]).mean()))
    boot = {m: np.asarray(v) for m, v in draws.items()}
    gap, gap_boot = point[upper] - point[baseline], boot[upper] - boot[baseline]
    out = {}
    for m in probs:
        closed = boot[m] - boot[baseline]
        share = closed / np.where(gap_boot != 0, gap_boot, np.nan)
        out[m] = {"auc_macro": point[m], "auc_ci_low": float(np.percentile(boot[m], 2.5)),
                  "auc_ci_high": float(np.percentile(boot[m], 97.5)),
                  "gap_closed": (point[m] - point[baseline]) / gap if gap else float("nan"),
                  "gap_closed_ci_low": float(np.nanpercentile(share, 2.5)),
                  "gap_closed_ci_high": float(np.nanpercentile(share, 97.5)),
                  "gain_over_baseline_ci_low": float(np.percentile(closed, 2.5)),
                  "gain_over_baseline_ci_high": float(np.percentile(closed, 97.5))}
    out["gap"] = {"auc_macro": gap, "auc_ci_low": float(np.percentile(gap_boot, 2.5)),
                  "auc_ci_high": float(np.percentile(gap_boot, 97.5)), "n_samples": int(len(labels)),
                  "n_bootstrap": int(len(gap_boot))}
    return out
