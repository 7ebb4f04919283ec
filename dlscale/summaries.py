"""What a person reads of an evaluation besides its figures: TensorBoard summaries (rank 0) and the console table."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from dlscale.figures import grid_figure, reliability_figure, roc_figure


def scalar_items(metrics: Mapping[str, object]) -> dict[str, float]:
    """The finite scalar entries of a metrics dict (lists such as the confusion matrix are left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def log_evaluation(writer, step: int, metrics: Mapping[str, object], scores: Mapping[str, np.ndarray],
                   class_names: Sequence[str], prefix: str = "val") -> None:
    """Scalars, ROC figure, reliability diagram, per-class PR curves, an input/reconstruction grid and a
    super-resolution grid (HR / LR / bicubic / SR / |SR - HR|), at `step`."""
    for key, value in scalar_items(metrics).items():
        writer.add_scalar(key, value, step)
    if "probs" in scores:
        writer.add_figure(f"{prefix}/roc", roc_figure({prefix: (scores["probs"], scores["labels"])}, class_names),
                          step)
        writer.add_figure(f"{prefix}/reliability", reliability_figure({prefix: (scores["probs"], scores["labels"])}),
                          step)
        for k, name in enumerate(class_names):
            writer.add_pr_curve(f"{prefix}/pr/{name}", scores["labels"] == k, scores["probs"][:, k], step)
    if "recon_examples" in scores:
        from torchvision.utils import make_grid
        pairs = torch.from_numpy(np.concatenate([scores["examples"], scores["recon_examples"]]))[:, :1]
        grid = make_grid(pairs, nrow=len(scores["examples"]), normalize=True, scale_each=True)
        writer.add_image(f"{prefix}/inputs_top_reconstructions_bottom", grid, step)
    if "sr_examples" in scores:
        writer.add_figure(f"{prefix}/superres_hr_lr_bicubic_sr_error", grid_figure(scores["sr_examples"]), step)


def metrics_table(metrics: Mapping[str, object], class_names: Sequence[str], prefix: str = "val",
                  probe: str = "probe") -> str:
    """A short aligned summary of the headline numbers (`prefix`: the split's keys, `probe`: the linear probe's)."""
    rows = [("samples", metrics.get(f"{prefix}/n_samples")), ("accuracy", metrics.get(f"{prefix}/accuracy")),
            ("ECE (15 bins)", metrics.get(f"{prefix}/ece")),
            ("macro AUC", metrics.get(f"{prefix}/auc_macro")),
            *((f"AUC {c}", metrics.get(f"{prefix}/auc/{c}")) for c in class_names),
            ("recon MSE", metrics.get(f"{prefix}/recon_mse")),
            *((name, metrics.get(f"{prefix}/{key}")) for name, key in (
                ("PSNR (dB)", "psnr"), ("PSNR bicubic", "psnr_bicubic"), ("SSIM", "ssim"),
                ("SSIM bicubic", "ssim_bicubic"))),
            ("probe accuracy", metrics.get(f"{probe}/accuracy")),
            ("probe macro AUC", metrics.get(f"{probe}/auc_macro"))]
    lines = []
    for name, value in rows:
        if value is None:
            continue
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        if name == "macro AUC" and f"{prefix}/auc_macro_ci_low" in metrics:
            lo, hi = metrics[f"{prefix}/auc_macro_ci_low"], metrics[f"{prefix}/auc_macro_ci_high"]
            if isinstance(lo, float) and math.isfinite(lo):
                text += f"  (95% CI {lo:.3f}-{hi:.3f})"
        lines.append(f"  {name:<16} {text}")
    return "\n".join(lines)
