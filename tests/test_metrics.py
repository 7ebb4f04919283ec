"""Evaluation metrics against scikit-learn computed independently, the linear probe, and the ROC figure."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, mean_absolute_error, roc_auc_score
from sklearn.preprocessing import label_binarize

from dlscale.data.classes import CLASSES
from dlscale.figures import roc_figure
from dlscale.metrics import classification_metrics, linear_probe, regression_metrics


def random_scores(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax scores weakly correlated with random labels, so AUCs sit between chance and 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 0.8 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def test_classification_metrics_equal_scikit_learn():
    probs, labels = random_scores()
    metrics = classification_metrics(probs, labels, CLASSES, n_bootstrap=20)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(axis=1)))
    assert metrics["auc_macro"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert metrics["auc_micro"] == pytest.approx(
        roc_auc_score(label_binarize(labels, classes=[0, 1, 2]), probs, average="micro"))
    for k, name in enumerate(CLASSES):
        assert metrics[f"auc/{name}"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]))
    assert metrics["confusion_matrix"] == confusion_matrix(labels, probs.argmax(axis=1)).tolist()
    assert metrics["n_samples"] == 600
    assert 0.6 < metrics["auc_macro"] < 0.9


def test_bootstrap_ci_brackets_the_estimate_and_is_reproducible():
    probs, labels = random_scores()
    first = classification_metrics(probs, labels, CLASSES, n_bootstrap=100, seed=3)
    again = classification_metrics(probs, labels, CLASSES, n_bootstrap=100, seed=3)
    assert first["auc_macro_ci_low"] < first["auc_macro"] < first["auc_macro_ci_high"]
    assert first["auc_macro_ci_high"] - first["auc_macro_ci_low"] < 0.15
    assert first == again
    assert first["auc_macro_ci_skipped"] == 0


def test_bootstrap_skips_and_counts_resamples_missing_a_class():
    probs, labels = random_scores(n=12)
    labels = np.array([0] * 6 + [1] * 5 + [2])
    # The single axion sample is left out of a resample with probability (11/12)^12 ~ 0.35.
    metrics = classification_metrics(probs, labels, CLASSES, n_bootstrap=200)
    assert 40 < metrics["auc_macro_ci_skipped"] < 100
    assert np.isfinite(metrics["auc_macro_ci_low"])


def test_perfectly_separable_scores_give_auc_one():
    labels = np.repeat([0, 1, 2], 10)
    probs = np.eye(3)[labels] * 0.9 + 0.05
    metrics = classification_metrics(probs, labels, CLASSES, n_bootstrap=10)
    assert metrics["accuracy"] == 1.0
    assert metrics["auc_macro"] == metrics["auc_micro"] == metrics["auc/axion"] == 1.0
    assert metrics["auc_macro_ci_low"] == metrics["auc_macro_ci_high"] == 1.0
    assert metrics["confusion_matrix"] == [[10, 0, 0], [0, 10, 0], [0, 0, 10]]


def test_mismatched_shapes_are_refused_with_both_shapes():
    probs, labels = random_scores()
    with pytest.raises(ValueError, match=r"probs \(600, 3\) and labels \(599,\)"):
        classification_metrics(probs, labels[:-1], CLASSES)


def test_absent_class_is_named():
    probs, labels = random_scores()
    with pytest.raises(ValueError, match=r"\['cdm'\] have no samples"):
        classification_metrics(probs, np.where(labels == 1, 0, labels), CLASSES)


def test_regression_mae_equals_scikit_learn():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
    metrics = regression_metrics(pred, target, ["theta_E", "e1"])
    assert metrics == pytest.approx({
        "mae/theta_E": mean_absolute_error(target[:, 0], pred[:, 0]),
        "mae/e1": mean_absolute_error(target[:, 1], pred[:, 1]),
    })


def test_regression_names_must_match_targets():
    with pytest.raises(ValueError, match="theta_E"):
        regression_metrics(np.zeros((5, 2)), np.zeros((5, 2)), ["theta_E"])


def separable_features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16-d features whose class is a linear function of them, at an arbitrary scale and offset."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, 16))
    features[:, :3] += 4.0 * np.eye(3)[labels]
    return 100.0 * features + 7.0, labels


def test_linear_probe_separates_linearly_separable_features():
    train, eval_ = separable_features(300, seed=0), separable_features(300, seed=1)
    metrics = linear_probe(*train, *eval_, CLASSES)
    assert metrics["accuracy"] > 0.95
    assert metrics["auc_macro"] > 0.99


def test_linear_probe_is_near_chance_on_random_labels():
    rng = np.random.default_rng(2)
    train_features, eval_features = rng.normal(size=(600, 16)), rng.normal(size=(3000, 16))
    metrics = linear_probe(train_features, rng.integers(0, 3, 600), eval_features, rng.integers(0, 3, 3000), CLASSES)
    assert abs(metrics["accuracy"] - 1 / 3) < 0.05
    assert abs(metrics["auc_macro"] - 0.5) < 0.05


def test_linear_probe_does_not_depend_on_feature_units():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 400)
    features = rng.normal(size=(400, 8)) + 0.7 * np.eye(3, 8)[labels]
    units = rng.uniform(0.01, 100.0, size=8)
    plain = linear_probe(features[:200], labels[:200], features[200:], labels[200:], CLASSES)
    rescaled = linear_probe(features[:200] * units + 5.0, labels[:200], features[200:] * units + 5.0, labels[200:],
                            CLASSES)
    assert rescaled == pytest.approx(plain, abs=1e-4)


def test_linear_probe_needs_every_class_in_training():
    features, labels = separable_features(60, seed=0)
    with pytest.raises(ValueError, match=r"train_labels: classes \['axion'\]"):
        linear_probe(features, np.minimum(labels, 1), features, labels, CLASSES)


def test_roc_figure_draws_one_line_per_class_per_stage():
    curves = {"supervised": random_scores(seed=0), "multitask": random_scores(seed=1)}
    axes = roc_figure(curves, CLASSES).axes[0]
    lines = [line for line in axes.get_lines() if not line.get_label().startswith("_")]
    assert len(lines) == 6
    styles = {stage: {line.get_linestyle() for line in lines if line.get_label().startswith(stage)} for stage in curves}
    assert len(styles["supervised"]) == len(styles["multitask"]) == 1
    assert styles["supervised"] != styles["multitask"]
    probs, labels = curves["multitask"]
    expected_label = f"multitask cdm (AUC {roc_auc_score(labels == 1, probs[:, 1]):.3f})"
    assert expected_label in [text.get_text() for text in axes.get_legend().get_texts()]
    assert {line.get_color() for line in lines if "axion" in line.get_label()} == {"C2"}


def test_roc_figure_renders_to_png(tmp_path):
    figure = roc_figure({"val": random_scores()}, CLASSES)
    figure.savefig(tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gap_closed_is_the_share_of_the_auc_gap_with_a_paired_bootstrap_ci():
    from dlscale.metrics import gap_closed, one_vs_rest_aucs
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 200)
    onehot = np.eye(3)[labels]
    probs = {name: onehot * strength + rng.random((600, 3)) for name, strength in
             (("source_only", 0.1), ("adapted", 0.4), ("target_supervised", 2.0))}
    auc = {m: one_vs_rest_aucs(p, labels).mean() for m, p in probs.items()}
    out = gap_closed(probs, labels, "source_only", "target_supervised", n_bootstrap=200)
    expected = (auc["adapted"] - auc["source_only"]) / (auc["target_supervised"] - auc["source_only"])
    assert out["adapted"]["gap_closed"] == pytest.approx(expected)
    assert out["source_only"]["gap_closed"] == 0.0 and out["target_supervised"]["gap_closed"] == pytest.approx(1.0)
    assert out["adapted"]["gap_closed_ci_low"] < expected < out["adapted"]["gap_closed_ci_high"]
    assert out["adapted"]["gain_over_baseline_ci_low"] > 0    # clearly better than the baseline: CI above 0
    assert out["gap"]["n_samples"] == 600 and out["gap"]["auc_macro"] == pytest.approx(
        auc["target_supervised"] - auc["source_only"])
    with pytest.raises(ValueError, match="'upper'"):
        gap_closed(probs, labels, "source_only", "upper")
