"""Fitting the classification head, at the end of training, to the features it is used on.

Why: the head is trained on features computed with BatchNorm in batch-statistics mode, and used on features computed
with the running statistics. For lensing images those differ more than the class signal does: every image has its
ring at the same place, so a pooled feature varies across images by ~1% of its mean (measured on the demo's small
CNN: std 0.007 at mean 0.45), and the head's standardisation multiplies that by ~140. The encoder's running
statistics then shift the standardised features by up to 0.7 of their spread (median 0.1), the head's argmax leans
to one class (the demo: 0.90 accuracy at macro AUC 0.989, 81 of 400 axion images called cdm), while a linear probe
fitted on the very same eval-mode features reaches 0.95. Test-time augmentation, the end-of-schedule learning rate
and precise BatchNorm statistics were measured and are not the cause.

The fix: after the last step, the head's standardisation is set to the mean and variance of the eval-mode features
of the probe's train set (`eval.probe_samples` training images, an even share of each class: the training split
only, never the scored one), and its linear layer is fitted to them by full-batch L-BFGS on cross-entropy with the probe's L2
penalty (scikit-learn's C = 1), starting from the trained weights. Float64 on the CPU, the same on every rank.

LP-FT's regression head starts as the regression probe instead (`fit_regressor`): scikit-learn's ridge on
standardised features, folded into the head's one linear layer, which predicts targets standardised with the run's
train-split statistics. The regression head has the same mismatch at the end (a constant offset of its predictions:
+0.015-0.019 dex on every axion mass of a 36,000-step run, on its train images too), and is refitted to its eval-mode
features by least absolute deviations, the loss of the MAE it is scored by (`refit_regressor`).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import QuantileRegressor
from torch import nn
from torch.nn import functional as F

from dlscale.metrics import ridge_probe

L2_C = 1.0            # the linear probe's inverse regularisation strength (LogisticRegression's default)
MAX_ITERATIONS = 500
LAD_SAMPLES_PER_COEFFICIENT = 20
"""Below this many training samples per coefficient of a target (features + 1) the regression refit moves only the
head's intercepts: an unpenalised least-absolute-deviations fit of 97 coefficients to 100 samples scored 0.276 dex
where the trained head scored 0.053, to 1,000 samples level with the intercepts alone (0.0509 against 0.0508), to
9,600 samples 0.0488 (one 36,000-step axion-mass run, its 2,400 val images)."""


def refit_classifier(norm: nn.Module, linear: nn.Linear, features: np.ndarray, labels: np.ndarray) -> dict:
    """Re-standardise and re-fit `linear` (after `norm`: a BatchNorm1d without affine parameters, or Identity for
    heads of dlscale 0.1, into whose linear layer the standardisation is folded) on (N, C) `features`. Returns
    the head's accuracy on those features before and after, and the sample count."""
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    mean, var = x.mean(0), x.var(0)
    eps = norm.eps if isinstance(norm, nn.BatchNorm1d) else 1e-5
    scale = (var + eps).sqrt()
    z = (x - mean) / scale
    with torch.no_grad():
        before = float((linear(norm(x.to(linear.weight))).argmax(1).cpu() == y).double().mean())   # on its device
        weight, bias = _head_weights(norm, linear, mean, scale)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    penalty = 1.0 / (2.0 * L2_C * len(y))
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=MAX_ITERATIONS, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + penalty * weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(objective)
    with torch.no_grad():
        if isinstance(norm, nn.BatchNorm1d):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        else:   # no standardisation layer: fold it into the linear layer
            linear.weight.copy_(weight / scale)
            linear.bias.copy_(bias - (weight / scale) @ mean)
        after = float((linear(norm(x.to(linear.weight))).argmax(1).cpu() == y).double().mean())
    return {"train_accuracy_before": before, "train_accuracy": after, "samples": int(len(y))}


def _head_weights(norm: nn.Module, linear: nn.Linear, mean: torch.Tensor, scale: torch.Tensor):
    """The trained head as weights on features standardised with (mean, scale): the starting point of the fit."""
    weight, bias = linear.weight.detach().double().cpu(), linear.bias.detach().double().cpu()   # fitted on the CPU
    if isinstance(norm, nn.BatchNorm1d):   # z' = (x - m) / s for the old statistics; x = mean + scale z
        old_scale = (norm.running_var.double().cpu() + norm.eps).sqrt()
        old_mean = norm.running_mean.double().cpu()
    else:
        old_scale, old_mean = torch.ones_like(mean), torch.zeros_like(mean)
    w = weight * (scale / old_scale)
    return w.clone(), (bias + weight @ ((mean - old_mean) / old_scale)).clone()


def fit_regressor(linear: nn.Linear, features: np.ndarray, targets: np.ndarray, mean, std) -> dict:
    """Set `linear` (pooled features -> targets standardised as (y - `mean`) / `std`) to the ridge probe fitted on
    (N, C) `features` and (N, T) `targets` in their units: its feature standardisation and the target statistics
    folded into the weights, so the head predicts what the probe does. Returns the probe's mean absolute error on
    those targets (in their units) and the sample count."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(targets, dtype=np.float64).reshape(len(features), -1)
    probe = ridge_probe().fit(x, y)
    scaler, ridge = probe[0], probe[-1]
    coef = np.atleast_2d(ridge.coef_) / scaler.scale_                       # (T, C) on the raw features
    intercept = np.atleast_1d(ridge.intercept_) - coef @ scaler.mean_
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(coef / std[:, None]))
        linear.bias.copy_(torch.as_tensor((intercept - mean) / std))
    return {"train_mae": float(np.abs(probe.predict(x).reshape(y.shape) - y).mean()), "samples": int(len(y))}


def refit_regressor(linear: nn.Linear, features: np.ndarray, targets: np.ndarray, mean, std) -> dict:
    """Refit the trained regression head `linear` (pooled features -> targets standardised as (y - `mean`) / `std`)
    to (N, C) eval-mode `features` and (N, T) `targets` in their units, by least absolute deviations per target
    (scikit-learn's median `QuantileRegressor`, unpenalised): every weight when there are
    `LAD_SAMPLES_PER_COEFFICIENT` samples per coefficient, else only the intercept, moved by the median residual of
    the trained head. Samples with a non-finite target are left out. Returns the head's MAE on those samples (in
    the targets' units, averaged over targets) before and after, the parameters fitted per target and the count."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64).reshape(len(x), -1)
    keep = np.isfinite(y).all(1)
    x, y = x[keep], y[keep]
    if len(y) < 2:
        return {"samples": int(len(y)), "parameters": 0}
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    z = (y - mean) / std
    weight, bias = (p.detach().double().cpu().numpy().copy() for p in (linear.weight, linear.bias))   # any device
    before = x @ weight.T + bias
    whole = len(y) >= LAD_SAMPLES_PER_COEFFICIENT * (x.shape[1] + 1)
    for t in range(z.shape[1]):
        if whole:
            fit = QuantileRegressor(quantile=0.5, alpha=0.0, solver="highs").fit(x, z[:, t])
            weight[t], bias[t] = fit.coef_, fit.intercept_
        else:
            bias[t] += np.median(z[:, t] - before[:, t])
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight))
        linear.bias.copy_(torch.as_tensor(bias))
    after = x @ weight.T + bias
    return {"train_mae_before": float(np.abs(before * std + mean - y).mean()),
            "train_mae": float(np.abs(after * std + mean - y).mean()),
            "parameters": x.shape[1] + 1 if whole else 1, "samples": int(len(y))}
