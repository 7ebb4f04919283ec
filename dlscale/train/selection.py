"""Choosing an adapted model without target labels.

A user adapting to real data has no target labels, so published numbers that pick the checkpoint by labelled
target accuracy flatter their method. Two label-free rules, both ranking candidate runs (checkpoints, methods,
strengths) on data a user has:

- source validation: the labelled domain's validation macro AUC (blind to the shift; the classic default);
- deep embedded validation (You et al. 2019, "Towards accurate model selection in deep unsupervised domain
  adaptation"): the labelled validation loss importance-weighted towards the target, w(x) = p(target | x) /
  p(source | x) x n_source / n_target from a domain classifier (logistic regression, scikit-learn) on the
  candidate's own features of the labelled train split and the target's unlabelled images, with the control variate
  eta = -Cov(w L, w) / Var(w): DEV = mean(w L) + eta mean(w) - eta. Lower is better.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from dlscale.data.stream import eval_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.metrics import one_vs_rest_aucs


@torch.no_grad()
def split_outputs(model, data: StreamConfig, data_dir, split: str, device: torch.device) -> dict[str, np.ndarray]:
    """`probs`, `labels` and pooled `features` of every image of `split`, read with the evaluation transforms of
    `data` (a target's labels serve its scoring only: the label-free rules never read them)."""
    cfg = StreamConfig(batch_size=data.batch_size, num_workers=0, normalize=data.normalize, augment=False,
                       resize=data.resize, resize_mode=data.resize_mode, transforms="host")
    model = model.to(device).eval()
    rows: dict[str, list] = {"probs": [], "labels": [], "features": []}
    for batch in eval_loader(data_dir, cfg, split=split):
        out = model(batch["image"].to(device))
        rows["probs"].append(torch.softmax(out["logits"].float(), 1).cpu())
        rows["features"].append(out["features"].float().cpu())
        rows["labels"].append(batch["label"])
    return {k: torch.cat(v).numpy() for k, v in rows.items()}


def importance_weights(source_features: np.ndarray, target_features: np.ndarray, validation_features: np.ndarray,
                       seed: int = 0) -> np.ndarray:
    """p(target | x) / p(source | x) x n_source / n_target on `validation_features`, from a logistic-regression
    domain classifier fitted on (standardised) source and target features."""
    x = np.concatenate([source_features, target_features])
    domain = np.r_[np.zeros(len(source_features)), np.ones(len(target_features))]
    scaler = StandardScaler().fit(x)
    classifier = LogisticRegression(max_iter=1000, random_state=seed).fit(scaler.transform(x), domain)
    p_target = classifier.predict_proba(scaler.transform(validation_features))[:, 1].clip(1e-6, 1 - 1e-6)
    return p_target / (1 - p_target) * len(source_features) / len(target_features)


def deep_embedded_validation(weights: np.ndarray, losses: np.ndarray) -> float:
    """DEV risk from importance weights and per-sample losses of the labelled validation set (lower is better)."""
    weighted = weights * losses
    variance = np.var(weights, ddof=1)
    eta = -np.cov(weighted, weights)[0, 1] / variance if variance > 0 else 0.0
    return float(weighted.mean() + eta * weights.mean() - eta)


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -np.log(probs[np.arange(len(labels)), labels].clip(1e-12))


def label_free_scores(source_train: dict, source_val: dict, target_features: np.ndarray, seed: int = 0) -> dict:
    """What a user without target labels can rank a candidate by: its labelled validation macro AUC
    (`source_auc_macro`) and its DEV risk (`dev_risk`), from its `split_outputs` on the labelled train and val
    splits and its features of the target's unlabelled images."""
    weights = importance_weights(source_train["features"], target_features, source_val["features"], seed)
    return {"source_auc_macro": float(one_vs_rest_aucs(source_val["probs"], source_val["labels"]).mean()),
            "dev_risk": deep_embedded_validation(weights, cross_entropy(source_val["probs"], source_val["labels"]))}
