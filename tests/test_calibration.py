"""Calibration: ECE (15 equal-width bins of the max probability) against torchmetrics and a hand computation, the
reliability diagram, and a temperature fitted on one split and applied to another."""
import numpy as np
import pytest
import torch

from dlscale.figures import reliability_figure
from dlscale.metrics import (apply_temperature, classification_metrics, expected_calibration_error, fit_temperature,
                             negative_log_likelihood, reliability_bins)
from dlscale.data.classes import CLASSES


def _scores(n=3000, seed=0, sharpness=3.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[labels]
    z = np.exp(sharpness * (logits - logits.max(1, keepdims=True)))
    return z / z.sum(1, keepdims=True), labels


def test_ece_by_hand_on_fixed_scores():
    probs = np.array([[0.95, 0.03, 0.02],    # bin 15 (0.9333, 1], right
                      [0.50, 0.30, 0.20],    # bin 8 (0.4667, 0.5333], wrong
                      [0.10, 0.52, 0.38],    # bin 8, right
                      [0.34, 0.33, 0.33]])   # bin 6 (0.3333, 0.4], wrong
    labels = np.array([0, 1, 1, 2])
    hand = (abs(1 - 0.95) * 1 + abs(0.5 - (0.50 + 0.52) / 2) * 2 + abs(0 - 0.34) * 1) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(hand, abs=1e-12)
    bins = reliability_bins(probs, labels)
    assert bins["count"].tolist() == [0, 0, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("sharpness", [0.5, 3.0, 10.0])
def test_ece_equals_torchmetrics(sharpness):
    from torchmetrics.functional.classification import multiclass_calibration_error
    probs, labels = _scores(sharpness=sharpness)
    reference = multiclass_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels), num_classes=3,
                                             n_bins=15, norm="l1")
    assert expected_calibration_error(probs, labels) == pytest.approx(float(reference), abs=1e-6)


def test_classification_metrics_report_ece():
    probs, labels = _scores()
    assert classification_metrics(probs, labels, CLASSES, n_bootstrap=0)["ece"] == \
        pytest.approx(expected_calibration_error(probs, labels))


def test_temperature_fitted_on_one_split_calibrates_another():
    """Over-confident scores: the logits are Gaussian noise + 1.5 on the true class, so the Bayes posterior is
    softmax(1.5 logits) and scores of softmax(3 logits) need a temperature of 2. The fitted one is close, and lowers
    ECE and NLL on held-out scores; the argmax, so the accuracy, is unchanged."""
    calib, calib_labels = _scores(seed=1, sharpness=3.0)
    probs, labels = _scores(seed=2, sharpness=3.0)
    temperature = fit_temperature(calib, calib_labels)
    assert 1.8 < temperature < 2.2
    calibrated = apply_temperature(probs, temperature)
    assert (calibrated.argmax(1) == probs.argmax(1)).all()
    assert expected_calibration_error(calibrated, labels) < 0.5 * expected_calibration_error(probs, labels)
    assert negative_log_likelihood(calibrated, labels) < negative_log_likelihood(probs, labels)
    np.testing.assert_allclose(calibrated.sum(1), 1.0)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-9)


def test_reliability_figure_draws_one_line_per_run_and_renders(tmp_path):
    good, labels = _scores(sharpness=1.0)
    sharp, _ = _scores(sharpness=5.0)
    figure = reliability_figure({"a": (good, labels), "b": (sharp, labels)})
    top = figure.axes[0]
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert len(legend) == 2 and legend[0].startswith("a (ECE ") and legend[1].startswith("b (ECE ")
    figure.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 1000


# ---- eval.calibration_split in a run ------------------------------------------------------------------------------

def test_a_run_fits_its_temperature_on_the_calibration_split_only(make_shards, tmp_path, tiny_args):
    import json
    from test_transfer import run_cli, train
    data = make_shards({"train": 120, "val": 60, "test": 60}, shard_size=20, samples_per_record=5, shape=(1, 16, 16))
    run = train("supervised", data, tmp_path / "run", *tiny_args, "--schedule.epochs=1",
                "--schedule.batches_per_epoch=3", "--eval.calibration_split=test")
    metrics = json.loads((run / "metrics.json").read_text())
    with np.load(run / "scores_val.npz") as z:
        probs, labels = z["probs"], z["labels"]
    assert metrics["val/temperature_fitted_on"] == "test" and metrics["val/temperature"] > 0
    assert metrics["val/ece"] == pytest.approx(expected_calibration_error(probs, labels))
    calibrated = apply_temperature(probs, metrics["val/temperature"])
    assert metrics["val/ece_calibrated"] == pytest.approx(expected_calibration_error(calibrated, labels))
    assert metrics["val/nll_calibrated"] == pytest.approx(negative_log_likelihood(calibrated, labels))
    assert (run / "reliability.png").stat().st_size > 1000

    refused = run_cli("train", "--stage", "supervised", "--data", data, "--run-dir", tmp_path / "bad", *tiny_args,
                      "--eval.calibration_split=val")
    assert refused.code == 2 and "eval.calibration_split='val' is the scored split" in refused.err
    assert not (tmp_path / "bad").exists()
    missing = run_cli("train", "--stage", "supervised", "--data", make_shards({"train": 60, "val": 30}),
                      "--run-dir", tmp_path / "bad2", *tiny_args, "--eval.calibration_split=test")
    assert missing.code == 2 and "eval.calibration_split='test' is not a split" in missing.err
    assert not (tmp_path / "bad2").exists()
