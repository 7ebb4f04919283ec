"""Label-free adaptation of the classification head to a target domain, after AdaBN (`data.target.head`,
`dlscale adapt-bn --head KIND`).

Why: after AdaBN the encoder's pooled features of the target still separate the classes (a linear probe fitted with
target labels on them reaches 0.96 macro AUC on the Model-II -> Model-III shift), but the source classifier's
boundary sits in the wrong place there (0.875). Each kind here refits the head's linear layer from what a user has:
the labelled domain's features and labels, and the target's unlabelled features, both standardised by the head's
own statistics (the source run's for the labelled images, AdaBN's for the target). No target label is read.

- `source`: the head as trained (AdaBN alone).
- `coral`: the target's standardised features re-coloured to the labelled domain's covariance (CORAL, Sun et al.
  2016, closed form) before the source head, folded into its linear layer.
- `em`: a Gaussian class-conditional model of the target's features with one shared covariance (linear
  discriminant analysis), initialised from the labelled classes' means and within-class covariance and fitted to the
  target's unlabelled features by EM with a uniform class prior held (Saerens et al. 2002 for the EM of
  class-conditional models on unlabelled data); its posterior is linear in the features, so it folds into
  the head's linear layer. Unsupervised EM follows the strongest structure of the target's features, which need not
  be the classes (measured: where the features do not separate them, on a noise shift, it falls to chance). Its fit
  is kept only if it claims no sharper classes than the labelled domain has: its own estimate of its error on the
  target (1 - mean largest posterior) must be at least `MIN_ERROR_RATIO` x the labelled model's estimate on the
  labelled images (the same model before EM, its posterior on the domain it was fitted to). Target clusters much
  sharper than the classes are on the labelled images, where the encoder was trained to separate them, are
  something else (brightness, noise level); then the source head stays, and the report says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.special import softmax
from torch import nn

from dlscale.registry import Registry

EM_SHRINKAGE = 0.03
"""share of the shared covariance replaced by its mean variance (x identity) at every EM step: 1,200 target images
estimate a 64 x 64 covariance poorly (0 measured 0.88, 0.01-0.2 0.93-0.94 on the instrument shift)"""
EM_MAX_ITERATIONS = 200
EM_TOLERANCE = 1e-8
"""EM stops when no class mean moves by more than this (standardised units)"""
MIN_ERROR_RATIO = 2 / 3
"""the EM fit's estimated target error over the labelled model's estimated error below which EM is refused;
measured 0.90-1.00 where EM found the classes (two seeds of the instrument shift after AdaBN: 0.85-0.88 -> 0.94
macro AUC), 0.06-0.46 where it did not (six feature sets of both shifts, EM at 0.50-0.54)"""


@dataclass
class HeadFeatures:
    """What a head refit reads: standardised pooled features of both domains and the trained linear layer."""
    source: np.ndarray
    """(N, C) the labelled images' features, standardised with the source run's head statistics"""
    labels: np.ndarray
    """(N,) their class indices"""
    target: np.ndarray
    """(M, C) the target's unlabelled features, standardised with the adapted (target) statistics"""
    weight: np.ndarray
    """(K, C) the trained linear layer"""
    bias: np.ndarray
    """(K,)"""

    def __post_init__(self) -> None:
        k = len(self.bias)
        present = np.unique(self.labels)
        if len(present) != k:
            raise ValueError(f"a head refit needs labelled images of every one of the {k} classes, got classes "
                             f"{present.tolist()} in {len(self.labels)} images (read more of the labelled split)")
        if len(self.target) <= k:
            raise ValueError(f"a head refit needs more target images than classes ({k}), got {len(self.target)}")


class TargetHead:
    """A kind of head refit: `fit` returns the new linear layer (weight (K, C), bias (K,)) on target features
    standardised by the adapted statistics, and a report for adabn.json."""
    name: ClassVar[str] = ""

    def fit(self, f: HeadFeatures) -> tuple[np.ndarray, np.ndarray, dict]:
        raise NotImplementedError


TARGET_HEADS: Registry[type[TargetHead]] = Registry("target head")


@TARGET_HEADS.register
class SourceHead(TargetHead):
    name = "source"

    def fit(self, f: HeadFeatures) -> tuple[np.ndarray, np.ndarray, dict]:
        return f.weight, f.bias, {}


SOURCE_HEAD = SourceHead.name
"""the kind that keeps the trained head (AdaBN alone): the default"""


def matrix_power(symmetric: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(symmetric)
    return (vectors * values.clip(1e-12 * values.max()) ** power) @ vectors.T


@TARGET_HEADS.register
class CoralHead(TargetHead):
    """x -> (x - m_t) C_t^-1/2 C_s^1/2 + m_s before the source head (covariances + identity, as Sun et al.)."""
    name = "coral"

    def fit(self, f: HeadFeatures) -> tuple[np.ndarray, np.ndarray, dict]:
        eye = np.eye(f.source.shape[1])
        colour = matrix_power(np.cov(f.target, rowvar=False) + eye, -0.5) @ matrix_power(
            np.cov(f.source, rowvar=False) + eye, 0.5)
        weight = f.weight @ colour.T
        bias = f.bias + f.weight @ f.source.mean(0) - weight @ f.target.mean(0)
        return weight, bias, {}


@dataclass
class Mixture:
    """A Gaussian class-conditional model with one covariance and a uniform class prior."""
    means: np.ndarray
    """(K, C)"""
    covariance: np.ndarray
    """(C, C)"""

    def linear(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) whose softmax is the posterior: log N(x; mu_k, S) up to a term shared by the classes."""
        weight = np.linalg.solve(self.covariance, self.means.T).T
        return weight, -0.5 * np.einsum("kc,kc->k", weight, self.means)

    def posterior(self, x: np.ndarray) -> np.ndarray:
        weight, bias = self.linear()
        return softmax(x @ weight.T + bias, axis=1)


def shrunk(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    dim = len(covariance)
    return (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / dim * np.eye(dim)


def initial_mixture(source: np.ndarray, labels: np.ndarray, shrinkage: float = EM_SHRINKAGE) -> Mixture:
    """The labelled classes' means and (shrunk) within-class covariance."""
    means = np.stack([source[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    return Mixture(means, shrunk(np.cov(source - means[labels], rowvar=False), shrinkage))


def fit_mixture(source: np.ndarray, labels: np.ndarray, target: np.ndarray, shrinkage: float = EM_SHRINKAGE,
                max_iterations: int = EM_MAX_ITERATIONS) -> tuple[Mixture, int]:
    """EM on `target` from the labelled classes' means and within-class covariance; returns the fit and its
    iterations."""
    model = initial_mixture(source, labels, shrinkage)
    for iteration in range(1, max_iterations + 1):
        resp = model.posterior(target)
        means = resp.T @ target / resp.sum(0)[:, None]
        centred = target[:, None, :] - means[None]                                   # (M, K, C)
        covariance = np.einsum("mk,mkc,mkd->cd", resp, centred, centred) / len(target)
        moved = np.abs(means - model.means).max()
        model = Mixture(means, shrunk(covariance, shrinkage))
        if moved < EM_TOLERANCE:
            break
    return model, iteration


def estimated_error(mixture: Mixture, x: np.ndarray) -> float:
    """The mixture's own estimate of its error rate on `x`: 1 - the mean of its largest posterior."""
    return float(1 - mixture.posterior(x).max(1).mean())


@TARGET_HEADS.register
class EMHead(TargetHead):
    name = "em"

    def fit(self, f: HeadFeatures) -> tuple[np.ndarray, np.ndarray, dict]:
        labelled = initial_mixture(f.source, f.labels)
        mixture, iterations = fit_mixture(f.source, f.labels, f.target)
        errors = {"labelled": estimated_error(labelled, f.source), "em_target": estimated_error(mixture, f.target)}
        kept = errors["em_target"] >= MIN_ERROR_RATIO * errors["labelled"]
        weight, bias = mixture.linear()
        pseudo_labels = (f.target @ weight.T + bias).argmax(1)
        report = {"em_iterations": iterations, "estimated_error": errors, "min_error_ratio": MIN_ERROR_RATIO,
                  "kept": bool(kept),
                  "em_pseudo_label_counts": np.bincount(pseudo_labels, minlength=len(bias)).tolist()}
        return (weight, bias, report) if kept else (f.weight, f.bias, report)


@torch.no_grad()
def standardised_features(model: nn.Module, batches: list[torch.Tensor]) -> np.ndarray:
    """Pooled features of `batches` after the classification head's standardisation (eval mode), float64."""
    model.eval()
    norm = model.heads["classification"].norm
    return torch.cat([norm(model.features(images)).double().cpu() for images in batches]).numpy()


@torch.no_grad()
def refit_head(name: str, adapted: nn.Module, source_model: nn.Module, source_batches: list[torch.Tensor],
               labels: np.ndarray, target_batches: list[torch.Tensor]) -> dict:
    """Set `adapted`'s classification head (its statistics the target's) to the `name` refit; `source_model` is the
    run as trained (source statistics), `source_batches` / `labels` its labelled images. Returns the report."""
    linear = adapted.heads["classification"].linear
    features = HeadFeatures(standardised_features(source_model, source_batches), labels,
                            standardised_features(adapted, target_batches),
                            linear.weight.double().cpu().numpy(), linear.bias.double().cpu().numpy())
    weight, bias, report = TARGET_HEADS.get_class(name)().fit(features)
    linear.weight.copy_(torch.as_tensor(weight))
    linear.bias.copy_(torch.as_tensor(bias))
    return {"kind": name, "labelled_images": len(labels), **report}
