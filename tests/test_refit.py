"""The classification head fitted, after training, to the eval-mode features it is used on (dlscale.train.refit):
the same minimiser as the linear probe's logistic regression, for heads with and without a standardisation layer."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from dlscale.models.heads import ClassifierHead
from dlscale.train.refit import refit_classifier, refit_regressor


def _lensing_like_features(n=900, dims=16, seed=0):
    """Pooled features as lensing encoders give them: mean ~0.45, spread across images ~1% of it, class signal in
    that spread."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = rng.normal(size=(3, dims))
    z = rng.normal(size=(n, dims)) + 0.8 * centres[labels]
    return (0.45 + 0.007 * z).astype(np.float32), labels


def _head(standardize: bool, dims=16, seed=0):
    torch.manual_seed(seed)
    head = ClassifierHead(dims, 3, standardize=standardize).eval()
    if standardize:   # statistics of other (batch-statistics) features: shifted by half their spread
        head.norm.running_mean.fill_(0.45 + 0.0035)
        head.norm.running_var.fill_(0.007 ** 2 * 1.3)
    return head


def _probs(head, features):
    with torch.no_grad():
        return torch.softmax(head(torch.from_numpy(features)).double(), 1).numpy()


@pytest.mark.parametrize("standardize", [True, False])
def test_refit_head_equals_the_linear_probe_on_the_same_features(standardize):
    features, labels = _lensing_like_features()
    head = _head(standardize)
    fitted = refit_classifier(head.norm, head.linear, features, labels)
    x = features.astype(np.float64)   # standardised as the head does: sample variance + BatchNorm's eps
    mean, scale = x.mean(0), np.sqrt(x.var(0, ddof=1) + 1e-5)
    same_objective = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit((x - mean) / scale, labels)
    held_out, held_labels = _lensing_like_features(seed=1)
    ours = _probs(head, held_out)
    theirs = same_objective.predict_proba((held_out.astype(np.float64) - mean) / scale)
    assert np.abs(ours - theirs).max() < 2e-3
    assert (ours.argmax(1) == theirs.argmax(1)).mean() > 0.995
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, labels)   # the run's probe
    assert (ours.argmax(1) == held_labels).mean() >= probe.score(held_out, held_labels) - 0.01
    assert fitted["samples"] == len(labels)
    assert fitted["train_accuracy"] == pytest.approx((_probs(head, features).argmax(1) == labels).mean())
    assert fitted["train_accuracy"] > fitted["train_accuracy_before"]


def test_refit_sets_the_standardisation_to_the_features_statistics():
    features, labels = _lensing_like_features()
    head = _head(True)
    refit_classifier(head.norm, head.linear, features, labels)
    np.testing.assert_allclose(head.norm.running_mean.numpy(), features.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(head.norm.running_var.numpy(), features.astype(np.float64).var(0, ddof=1), rtol=1e-4)


def test_refit_is_deterministic():
    features, labels = _lensing_like_features()
    heads = [_head(True), _head(True)]
    for head in heads:
        refit_classifier(head.norm, head.linear, features, labels)
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values()):
        assert torch.equal(a, b)


def test_refit_starts_from_the_trained_head():
    """Already the optimum: the refit leaves its predictions where they were."""
    features, labels = _lensing_like_features()
    head = _head(True)
    refit_classifier(head.norm, head.linear, features, labels)
    before = _probs(head, features)
    again = refit_classifier(head.norm, head.linear, features, labels)
    assert np.abs(_probs(head, features) - before).max() < 1e-5
    assert again["train_accuracy_before"] == again["train_accuracy"]


def test_identity_norm_gets_the_standardisation_folded_into_the_linear_layer():
    features, labels = _lensing_like_features()
    with_norm, without = _head(True), _head(False)
    refit_classifier(with_norm.norm, with_norm.linear, features, labels)
    refit_classifier(without.norm, without.linear, features, labels)
    assert isinstance(without.norm, nn.Identity)
    assert np.abs(_probs(with_norm, features) - _probs(without, features)).max() < 1e-3


# ---- in a training run: the gap to the probe measured on simulated lenses, with and without the refit -----------

@pytest.fixture(scope="module")
def simulated_lenses(tmp_path_factory):
    from dlscale.sim import simulate_main
    out = tmp_path_factory.mktemp("refit") / "data"
    assert simulate_main(["--preset", "model_ii", "--n-per-class", "400", "--out", str(out), "--splits",
                          "train=0.75,val=0.25", "--shard-size", "256"]) == 0
    return out


def test_trained_head_reaches_the_probe_accuracy_after_the_refit(simulated_lenses, tmp_path):
    """The same training twice (deterministic): the head as trained lags the probe on its own features by more
    than 0.02 on lensing images; refitted, it is within 0.02 of it and better calibrated."""
    import json
    from test_transfer import train
    common = ["--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=16",
              "--data.num_workers=0", "--data.shuffle_buffer=256", "--schedule.epochs=6", "--optim.lr=3e-3",
              "--optim.warmup_steps=20", "--eval.n_bootstrap=20", "--eval.probe_samples=900"]
    runs = {refit: json.loads((train("supervised", simulated_lenses, tmp_path / f"refit_{refit}", *common,
                                     f"--model.task_options.classification.refit_head={refit}")
                               / "metrics.json").read_text()) for refit in ("false", "true")}
    as_trained, refitted = runs["false"], runs["true"]
    assert as_trained["probe/accuracy"] == refitted["probe/accuracy"]          # the same encoder, the same probe
    assert as_trained["val/accuracy"] < as_trained["probe/accuracy"] - 0.02     # the defect, measurable here
    assert abs(refitted["val/accuracy"] - refitted["probe/accuracy"]) <= 0.02
    assert refitted["val/ece"] < as_trained["val/ece"]
    assert refitted["refit/train_accuracy"] > refitted["refit/train_accuracy_before"]
    assert refitted["refit/samples"] == 900 and not any(k.startswith("refit/") for k in as_trained)


# ---- the regression head, refitted by least absolute deviations ---------------------------------------------------

def _regression_problem(n, dims=8, targets=2, seed=0):
    """Features and targets in physical units (mean 3, spread 0.5) with heavy-tailed noise, and a head trained
    elsewhere: the true weights, off by a constant on every prediction."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dims))
    coef = rng.normal(size=(targets, dims))
    y = 3.0 + 0.5 * (x @ coef.T + 0.3 * rng.standard_t(2, size=(n, targets)))
    linear = nn.Linear(dims, targets).double()
    with torch.no_grad():   # standardised targets: (y - 3) / 0.5 = x @ coef.T + noise; plus an offset of 0.4
        linear.weight.copy_(torch.from_numpy(coef))
        linear.bias.fill_(0.4)
    return x, y, linear, np.full(targets, 3.0), np.full(targets, 0.5)


def test_regression_refit_with_enough_samples_equals_scikit_learn_s_median_regression_per_target():
    from sklearn.linear_model import QuantileRegressor
    x, y, linear, mean, std = _regression_problem(800)
    fitted = refit_regressor(linear, x, y, mean, std)
    with torch.no_grad():
        pred = linear(torch.from_numpy(x)).numpy() * std + mean
    for t in range(y.shape[1]):
        direct = QuantileRegressor(quantile=0.5, alpha=0.0, solver="highs").fit(x, y[:, t]).predict(x)
        assert np.allclose(pred[:, t], direct, rtol=1e-6, atol=1e-6)
    assert fitted["parameters"] == 9 and fitted["samples"] == 800
    true_head = np.abs(y - (3.0 + 0.5 * (x @ _regression_problem(800)[2].weight.detach().numpy().T))).mean()
    assert fitted["train_mae"] <= true_head < fitted["train_mae_before"] - 0.05   # no linear head fits it better


def test_regression_refit_with_few_samples_moves_only_the_intercepts_to_a_zero_median_residual():
    x, y, linear, mean, std = _regression_problem(50)
    weight = linear.weight.detach().clone()
    fitted = refit_regressor(linear, x, y, mean, std)
    assert torch.equal(linear.weight, weight)
    with torch.no_grad():
        pred = linear(torch.from_numpy(x)).numpy() * std + mean
    assert np.allclose(np.median(y - pred, axis=0), 0, atol=1e-12)
    assert fitted["parameters"] == 1 and fitted["train_mae"] < fitted["train_mae_before"]


def test_regression_refit_leaves_out_samples_without_a_target():
    x, y, linear, mean, std = _regression_problem(60)
    y[::3, 1] = np.nan
    clean = nn.Linear(8, 2).double()
    clean.load_state_dict(linear.state_dict())
    assert refit_regressor(linear, x, y, mean, std)["samples"] == 40
    refit_regressor(clean, x[np.isfinite(y).all(1)], y[np.isfinite(y).all(1)], mean, std)
    assert torch.equal(linear.bias, clean.bias)
