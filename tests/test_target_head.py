"""Label-free head refits after AdaBN (`dlscale.train.target_head`), against direct computations on tiny feature
sets: CORAL's re-colouring folded into the linear layer, the EM mixture's posterior as that layer, EM finding
target classes that moved, an EM fit sharper than the labelled classes refused, bad input refused; self-training's class-balanced choice of
pseudo-labels."""
import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.special import softmax
from scipy.stats import multivariate_normal

from dlscale.metrics import one_vs_rest_aucs
from dlscale.train.target_head import EM_SHRINKAGE, TARGET_HEADS, HeadFeatures, fit_mixture
from dlscale.train.target_selftrain import balanced_confident

K, C = 3, 4


def gaussian_classes(rng, means: np.ndarray, n: int, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % len(means)
    return means[labels] + spread * rng.standard_normal((n, means.shape[1])), labels


def source_head(source: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A linear layer that classifies the labelled features (nearest class mean)."""
    means = np.stack([source[labels == k].mean(0) for k in range(K)])
    return means, -0.5 * (means ** 2).sum(1)


def moved_target(seed: int = 0) -> tuple[HeadFeatures, np.ndarray]:
    """Labelled classes at three corners; on the target each class sits 40% of the way towards the next one's place,
    where the source head calls most of them the wrong class. Returns the features and the target's labels."""
    rng = np.random.default_rng(seed)
    means = 3.0 * np.eye(K, C)
    source, labels = gaussian_classes(rng, means, 300)
    moved = means + 0.4 * (np.roll(means, -1, axis=0) - means)
    target, target_labels = gaussian_classes(rng, moved, 300)
    weight, bias = source_head(source, labels)
    return HeadFeatures(source, labels, target, weight, bias), target_labels


def logits(head: tuple, x: np.ndarray) -> np.ndarray:
    weight, bias = head[:2]
    return x @ weight.T + bias


def test_coral_head_is_the_source_head_on_target_features_recoloured_to_the_source_covariance():
    f, _ = moved_target()
    rng = np.random.default_rng(1)
    f.target = f.target @ rng.standard_normal((C, C))   # another covariance
    head = TARGET_HEADS["coral"]().fit(f)
    eye = np.eye(C)
    recolour = np.linalg.inv(sqrtm(np.cov(f.target, rowvar=False) + eye)) @ sqrtm(np.cov(f.source, rowvar=False) + eye)
    recoloured = (f.target - f.target.mean(0)) @ recolour.real + f.source.mean(0)
    assert np.allclose(logits(head, f.target), recoloured @ f.weight.T + f.bias, atol=1e-8)


def test_em_head_is_the_posterior_of_its_fitted_mixture():
    f, _ = moved_target()
    mixture, _ = fit_mixture(f.source, f.labels, f.target)
    x = f.target[:20]
    density = np.stack([multivariate_normal(m, mixture.covariance).logpdf(x) for m in mixture.means], 1)
    assert np.allclose(mixture.posterior(x), softmax(density, 1), atol=1e-10)
    weight, bias = mixture.linear()
    assert np.allclose(softmax(x @ weight.T + bias, 1), softmax(density, 1), atol=1e-10)


def test_em_head_follows_target_classes_that_moved_and_is_kept():
    f, target_labels = moved_target()
    weight, bias, report = TARGET_HEADS["em"]().fit(f)
    before = (logits((f.weight, f.bias), f.target).argmax(1) == target_labels).mean()
    after = (logits((weight, bias), f.target).argmax(1) == target_labels).mean()
    assert before < 0.85 and after > 0.95, (before, after)
    assert report["kept"] and report["em_iterations"] > 1


def test_em_fit_sharper_than_the_labelled_classes_is_refused_and_the_source_head_kept():
    """Labelled classes that overlap (about 5% of them ambiguous); on the target three tight clumps along a nuisance
    axis that EM separates almost surely: far sharper than the classes are anywhere, so not the classes."""
    rng = np.random.default_rng(2)
    source, labels = gaussian_classes(rng, 3.0 * np.eye(K, C), 300, spread=1.2)
    target = 0.3 * rng.standard_normal((300, C)) + 1.0
    target[:, 0] += 4.0 * rng.integers(0, K, len(target)) - 4.0
    f = HeadFeatures(source, labels, target, *source_head(source, labels))
    weight, bias, report = TARGET_HEADS["em"]().fit(f)
    errors = report["estimated_error"]
    assert not report["kept"] and errors["em_target"] < report["min_error_ratio"] * errors["labelled"], report
    assert np.array_equal(weight, f.weight) and np.array_equal(bias, f.bias)


def test_the_estimated_errors_are_one_minus_the_mean_largest_posterior():
    f, _ = moved_target()
    _, _, report = TARGET_HEADS["em"]().fit(f)
    mixture, _ = fit_mixture(f.source, f.labels, f.target)
    assert report["estimated_error"]["em_target"] == pytest.approx(1 - mixture.posterior(f.target).max(1).mean())
    means = np.stack([f.source[f.labels == k].mean(0) for k in range(K)])
    within = np.cov(f.source - means[f.labels], rowvar=False)
    covariance = (1 - EM_SHRINKAGE) * within + EM_SHRINKAGE * np.trace(within) / C * np.eye(C)
    density = np.stack([multivariate_normal(m, covariance).logpdf(f.source) for m in means], 1)
    assert report["estimated_error"]["labelled"] == pytest.approx(1 - softmax(density, 1).max(1).mean())


def test_the_source_head_kind_changes_nothing():
    f, _ = moved_target()
    weight, bias, report = TARGET_HEADS["source"]().fit(f)
    assert np.array_equal(weight, f.weight) and np.array_equal(bias, f.bias) and report == {}


def test_em_head_is_deterministic():
    f, _ = moved_target()
    first, second = TARGET_HEADS["em"]().fit(f), TARGET_HEADS["em"]().fit(f)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_labelled_features_missing_a_class_are_refused():
    f, _ = moved_target()
    keep = f.labels != 2
    with pytest.raises(ValueError, match=r"every one of the 3 classes, got classes \[0, 1\]"):
        HeadFeatures(f.source[keep], f.labels[keep], f.target, f.weight, f.bias)


def test_fewer_target_images_than_classes_are_refused():
    f, _ = moved_target()
    with pytest.raises(ValueError, match="more target images than classes"):
        HeadFeatures(f.source, f.labels, f.target[:2], f.weight, f.bias)


def test_em_head_ranks_the_moved_target_better_than_the_source_head():
    f, target_labels = moved_target(seed=3)
    weight, bias, _ = TARGET_HEADS["em"]().fit(f)
    auc = {name: one_vs_rest_aucs(logits(head, f.target), target_labels).mean()
           for name, head in (("source", (f.weight, f.bias)), ("em", (weight, bias)))}
    assert auc["em"] > auc["source"] + 0.05, auc


def test_self_training_keeps_the_most_confident_images_of_every_pseudo_class_in_equal_numbers():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1],
                          [0.1, 0.5, 0.4], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    chosen, labels = balanced_confident(probs, keep=1.0)    # pseudo-classes of 4, 2 and 2 images: 2 of each
    assert chosen.tolist() == [0, 2, 5, 4, 6, 7] and labels.tolist() == [0, 0, 1, 1, 2, 2]
    chosen, labels = balanced_confident(probs, keep=0.5)
    assert chosen.tolist() == [0, 5, 6] and labels.tolist() == [0, 1, 2]
