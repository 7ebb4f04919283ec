"""The figures of an evaluation: one-vs-rest ROC curves and the reliability diagram (several runs or stages may be
overlaid), drawn on an Agg canvas without pyplot so they work headless and leave no global figure state, and saved
atomically."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from dlscale import io
from dlscale.metrics import ECE_BINS, check_scores, expected_calibration_error, one_vs_rest_aucs, reliability_bins


LINE_STYLES: tuple[str, ...] = ("-", "--", "-.", ":")


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve per class, one colour per class; several runs or stages (keys of `curves`, each
    `(probs, labels)`) are overlaid with one line style each. AUCs are in the legend.

    Drawn on an Agg canvas without pyplot, so it works headless and leaves no global figure state.
    """
    if not curves:
        raise ValueError("roc_figure needs at least one (probs, labels) pair")
    figure = Figure(figsize=(6.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, label="_chance")
    for stage_index, (stage, (probs, labels)) in enumerate(curves.items()):
        probs, labels = check_scores(probs, labels, class_names)
        aucs = one_vs_rest_aucs(probs, labels)
        for k, name in enumerate(class_names):
            fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
            prefix = f"{stage} " if len(curves) > 1 else ""
            axes.plot(fpr, tpr, color=f"C{k}", linestyle=LINE_STYLES[stage_index % len(LINE_STYLES)],
                      label=f"{prefix}{name} (AUC {aucs[k]:.3f})")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
             title="One-vs-rest ROC")
    axes.legend(loc="lower right", fontsize="small")
    return figure


def reliability_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int = ECE_BINS) -> Figure:
    """Reliability diagram: accuracy against mean confidence per confidence bin (one line per run or stage, ECE in
    the legend) over the diagonal of perfect calibration, and below it how many samples fall in each bin."""
    if not curves:
        raise ValueError("reliability_figure needs at least one (probs, labels) pair")
    figure = Figure(figsize=(6.0, 6.0), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, label="_perfect")
    edges = np.linspace(0, 1, n_bins + 1)
    for k, (name, (probs, labels)) in enumerate(curves.items()):
        bins = reliability_bins(probs, labels, n_bins)
        filled = bins["count"] > 0
        ece = expected_calibration_error(probs, labels, n_bins)
        top.plot(bins["confidence"][filled], bins["accuracy"][filled], marker="o", color=f"C{k}",
                 label=f"{name} (ECE {ece:.3f})")
        bottom.stairs(bins["count"], edges, color=f"C{k}", label=name)
    top.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="accuracy in bin", title=f"Reliability ({n_bins} bins)")
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="confidence (max probability)", ylabel="samples", yscale="log")
    return figure


def save_roc(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]) -> None:
    io.atomic_write(path, lambda f: roc_figure(curves, class_names).savefig(f, format="png", dpi=120))


def save_reliability(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    io.atomic_write(path, lambda f: reliability_figure(curves).savefig(f, format="png", dpi=120))


SR_TITLES = ("high resolution", "low resolution", "bicubic", "super-resolved", "|SR - HR|")
"""The columns of a super-resolution example grid (`dlscale.models.sr.example_grid`)."""


def grid_figure(rows: np.ndarray, titles=SR_TITLES, row_labels=None) -> Figure:
    """A matplotlib Figure of `example_grid` rows: one image per row, one column per view (|SR - HR| scaled to its
    own maximum); `row_labels` name the rows (e.g. the method)."""
    n, k = rows.shape[:2]
    figure = Figure(figsize=(2.0 * k, 2.0 * n), layout="constrained")
    FigureCanvasAgg(figure)
    for i in range(n):
        for j in range(k):
            axes = figure.add_subplot(n, k, i * k + j + 1)
            error = j == k - 1 and titles[-1].startswith("|")
            axes.imshow(rows[i, j], cmap="magma", vmin=0, vmax=float(rows[i, j].max()) if error else 1)
            axes.set_xticks([])
            axes.set_yticks([])
            if i == 0:
                axes.set_title(titles[j], fontsize="x-small")
            if j == 0 and row_labels is not None:
                axes.set_ylabel(row_labels[i], fontsize="x-small")
    return figure
