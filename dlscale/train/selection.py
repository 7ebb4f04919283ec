"""Choosing an adapted model without target labels.

A user adapting to real data has no target labels, so published numbers that pick the checkpoint by labelled
target accuracy flatter their method. Label-free rules, each ranking candidate runs (checkpoints, methods,
strengths) on data a user has:

- source validation: the labelled domain's validation macro AUC (blind to the shift; the classic default);
- deep embedded validation (You et al. 2019, "Towards accurate model selection in deep unsupervised domain
  adaptation"): the labelled validation loss importance-weighted towards the target, w(x) = p(target | x) /
  p(source | x) x n_source / n_target from a domain classifier (logistic regression, scikit-learn) on the
  candidate's own features of the labelled train split and the target's unlabelled images, with the control variate
  eta = -Cov(w L, w) / Var(w): DEV = mean(w L) + eta mean(w) - eta. Lower is better.

Two more read the candidate's predictions on the target's unlabelled images:

- average thresholded confidence (ATC, Garg et al. 2022, "Leveraging unlabeled data to predict out-of-distribution
  performance"): the negative entropy of a prediction is its confidence score; the threshold is set on the labelled
  validation set so that as many of its images score above it as the candidate classifies correctly there; the
  share of target images above it is the estimated target accuracy. Higher is better;
- soft neighbourhood density (SND, Saito et al. 2021, "Tune it the right way: unsupervised validation of domain
  adaptation via soft neighborhood density"): the mean entropy of each target image's softmax-weighted similarity
  to the others (L2-normalised class probabilities, temperature 0.05): predictions that cluster densely score
  high. Higher is better;
- information maximisation (IM; the objective of Shi & Sha 2012 and SHOT, Liang et al. 2020, used as a validator
  by Musgrave et al. 2022, "Benchmarking validation methods for unsupervised domain adaptation"): the entropy of
  the mean target prediction minus the mean entropy of the target predictions: confident predictions that use
  every class. Higher is better;
- batch nuclear-norm (BNM, Cui et al. 2020, a validator in Musgrave et al. 2022): the nuclear norm of the target's
  (images x classes) probability matrix over the number of images: also confident and diverse. Higher is better.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from dlscale.data.stream import eval_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.metrics import one_vs_rest_aucs
from dlscale.train.tasks.infomax import information_maximisation


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


SND_TEMPERATURE = 0.05
"""Saito et al. 2021's temperature of the neighbourhood softmax"""


def negative_entropy(probs: np.ndarray) -> np.ndarray:
    return (probs * np.log(probs.clip(1e-12))).sum(1)


def average_thresholded_confidence(source_val: dict, target_probs: np.ndarray) -> float:
    """ATC's estimated target accuracy from the labelled validation `split_outputs` and the target's probabilities."""
    score = negative_entropy(source_val["probs"])
    accuracy = float((source_val["probs"].argmax(1) == source_val["labels"]).mean())
    threshold = np.quantile(score, 1 - accuracy)
    return float((negative_entropy(target_probs) > threshold).mean())


def soft_neighbourhood_density(target_probs: np.ndarray, temperature: float = SND_TEMPERATURE) -> float:
    """SND of the target's class probabilities (each image's neighbourhood excludes itself)."""
    x = target_probs / np.linalg.norm(target_probs, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = softmax(similarity / temperature, axis=1)
    return float(-(neighbours * np.log(neighbours.clip(1e-12))).sum(1).mean())


def information_maximisation_score(target_probs: np.ndarray) -> float:
    """log K - SHOT's loss with diversity 1: the entropy of the mean prediction minus the mean entropy."""
    logits = torch.as_tensor(np.log(target_probs.clip(1e-12)))
    return float(np.log(target_probs.shape[1]) - information_maximisation(logits, diversity=1.0))


def batch_nuclear_norm(target_probs: np.ndarray) -> float:
    return float(np.linalg.svd(target_probs, compute_uv=False).sum() / len(target_probs))


def label_free_scores(source_train: dict, source_val: dict, target_features: np.ndarray, target_probs: np.ndarray,
                      seed: int = 0) -> dict:
    """What a user without target labels can rank a candidate by: its labelled validation macro AUC
    (`source_auc_macro`), its DEV risk (`dev_risk`), ATC's estimated target accuracy (`atc`), SND (`snd`), IM
    (`im`) and BNM (`bnm`), from its `split_outputs` on the labelled train and val splits and its features and
    probabilities of the target's unlabelled images."""
    weights = importance_weights(source_train["features"], target_features, source_val["features"], seed)
    return {"source_auc_macro": float(one_vs_rest_aucs(source_val["probs"], source_val["labels"]).mean()),
            "dev_risk": deep_embedded_validation(weights, cross_entropy(source_val["probs"], source_val["labels"])),
            "atc": average_thresholded_confidence(source_val, target_probs),
            "snd": soft_neighbourhood_density(target_probs), "im": information_maximisation_score(target_probs),
            "bnm": batch_nuclear_norm(target_probs)}
