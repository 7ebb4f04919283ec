"""Noise matching (task `noisematch`): the noise estimate on images of known noise, views that reach the target's
noise and are a no-op where the target is not noisier, the loss against the classifier on views made by hand,
target labels that never matter, options refused by name, and a 2-rank run with DataLoader workers that resumes
exactly from a SIGKILL."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlscale.data.classes import CLASSES
from dlscale.data.shards import DatasetWriter
from dlscale.data.transforms import normalize
from dlscale.models.heads import global_pool
from dlscale.train.model import build_run_model
from dlscale.train.sources import TARGET_DOMAIN
from dlscale.train.tasks.noisematch import (VIEW_SEED_KEY, NoiseMatchConfig, noise_matched_views, noise_model,
                                            noise_sigma)
from dlscale.train.tasks.selftraining import ViewCounter

sys.path.insert(0, str(Path(__file__).parent))
from conftest import separable_image  # noqa: E402
from test_adapt import BATCHES, EPOCHS, adapt_config  # noqa: E402
from test_adapt_methods import first_batch, first_step, whole_and_resumed  # noqa: E402

TARGET_NOISE = 0.3


def write_noisy_target(out: Path, permute_labels: bool = False, side: int = 32) -> Path:
    """The separable toy domain under extra Gaussian noise of sigma TARGET_NOISE (a shallower exposure).
    `permute_labels` relabels every image (the images stay the same)."""
    rng = np.random.default_rng(11)
    with DatasetWriter(out, (1, side, side), {"kind": "test"}, shard_size=50, samples_per_record=8,
                       classes=CLASSES) as w:
        for split, n in (("train", 120), ("val", 30)):
            for i in range(n):
                label = i % 3
                image = separable_image(rng, label, side) + rng.normal(0, TARGET_NOISE, (1, side, side))
                stored = (label + 1) % 3 if permute_labels else label
                w.add(split, image.astype(np.float32), stored, {"class": CLASSES[stored], "source_file": f"{i}"})
    return out


@pytest.fixture(scope="module")
def noisy_target(tmp_path_factory) -> Path:
    return write_noisy_target(tmp_path_factory.mktemp("noisy") / "data")


def smooth_lenses(n: int = 16, side: int = 64, slope: float = 0.01, width: float = 2.0) -> torch.Tensor:
    """(n, 1, side, side) noiseless Einstein rings (radii 5-12 pixels, Gaussian profile of sigma `width` pixels) of
    different brightness on a background sloping by `slope` per pixel, at least 0."""
    y, x = torch.meshgrid(torch.arange(side) - side / 2, torch.arange(side) - side / 2, indexing="ij")
    r = (x.square() + y.square()).sqrt()
    radius = torch.linspace(5, 12, n)[:, None, None]
    flux = torch.linspace(0.5, 3, n)[:, None, None]
    images = (flux * torch.exp(-(r - radius).square() / (2 * width ** 2)) + slope * x)[:, None]
    return images - images.amin((1, 2, 3), keepdim=True)


def gaussian(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.2])
def test_the_noise_estimate_finds_known_gaussian_noise_under_lenses_within_12_percent(sigma):
    clean = smooth_lenses()
    got = noise_sigma(clean + sigma * gaussian(clean.shape, 0))
    assert torch.allclose(got, torch.full_like(got, sigma), rtol=0.12)   # MAD of 62^2 residuals: +-5%
    assert float(noise_sigma(clean).max()) < 0.002   # the lens's own structure barely counts
    a, b = noise_model(clean + sigma * gaussian(clean.shape, 0), "gaussian")
    assert torch.equal(a, got.square()) and torch.equal(b, torch.zeros_like(b))


@pytest.mark.parametrize("a,b", [(1e-4, 0.02), (4e-4, 0.005), (1e-6, 0.01)])
def test_the_poisson_gaussian_fit_finds_background_and_shot_noise(a, b):
    """Noise of variance a + b x signal (a CCD's read and sky noise, and the lens's shot noise): the background's
    variance within 25% and the gain within 45% on every image (each from the 380 brightest pixels of one 64x64
    image)."""
    clean = smooth_lenses(slope=0.0)
    got_a, got_b = noise_model(clean + (a + b * clean).sqrt() * gaussian(clean.shape, 0), "poisson_gaussian")
    assert torch.allclose(got_a, torch.full_like(got_a, a), rtol=0.25)
    assert torch.allclose(got_b, torch.full_like(got_b, b), rtol=0.45)
    _, without_shot_noise = noise_model(clean + a ** 0.5 * gaussian(clean.shape, 0), "poisson_gaussian")
    assert float(without_shot_noise.max()) < 0.1 * b


def test_a_sharper_noiseless_target_is_not_taken_for_shot_noise():
    """Another PSF, no noise: arcs of sigma 1.5 pixels instead of 3. Their curvature is large on a few pixels only,
    which the median leaves out (arcs of sigma 1 pixel would give 0.001: the limit of the estimate)."""
    blurred, sharp = (normalize(smooth_lenses(slope=0.0, width=w), "minmax") for w in (3.0, 1.5))
    assert float(noise_model(sharp, "poisson_gaussian")[1].max()) < 2e-4   # a shot-noise gain of 0.005-0.02 above
    _, added = noise_matched_views(blurred, sharp, "poisson_gaussian", "minmax", torch.Generator().manual_seed(0))
    assert float(added.max()) < 2e-4


def test_views_reach_the_target_s_noise_replay_from_their_seed_and_stay_normalised():
    clean = normalize(smooth_lenses(slope=0.0), "minmax")
    target = normalize(smooth_lenses(slope=0.0) + (1e-4 + 0.01 * clean).sqrt() * gaussian(clean.shape, 1), "minmax")
    for model in ("gaussian", "poisson_gaussian"):
        views, added = noise_matched_views(clean, target, model, "minmax", torch.Generator().manual_seed(3))
        again, _ = noise_matched_views(clean, target, model, "minmax", torch.Generator().manual_seed(3))
        other, _ = noise_matched_views(clean, target, model, "minmax", torch.Generator().manual_seed(4))
        assert torch.equal(views, again) and not torch.equal(views, other)
        assert float(added.min()) >= 0
        flat = views.flatten(1)
        assert torch.allclose(flat.amin(1), torch.zeros(len(views)), atol=1e-6)
        assert torch.allclose(flat.amax(1), torch.ones(len(views)), atol=1e-6)
        (want_a, want_b), (got_a, got_b) = noise_model(target, model), noise_model(views, model)
        assert float(got_a.median()) == pytest.approx(float(want_a.median()), rel=0.3)
        assert float(got_b.median()) == pytest.approx(float(want_b.median()), rel=0.3, abs=1e-4)
    _, gaussian_added = noise_matched_views(clean, target, "gaussian", "minmax", torch.Generator().manual_seed(3))
    flat = gaussian_added.flatten(1)
    assert torch.equal(flat.amin(1), flat.amax(1))   # one variance per image: the partner's background
    assert float(want_b.median()) > 0.002 and float(added.flatten(1).std(1).min()) > 0   # shot noise: per pixel


def test_views_are_the_images_where_the_target_is_not_noisier():
    one_lens = smooth_lenses()[8:9].expand(16, -1, -1, -1)
    noisy = normalize(one_lens + 0.05 * gaussian((16, 1, 64, 64), 2), "minmax")
    for model in ("gaussian", "poisson_gaussian"):
        views, added = noise_matched_views(noisy, normalize(one_lens, "minmax"), model, "minmax",
                                           torch.Generator().manual_seed(0))
        assert float(added.max()) == 0.0 and torch.allclose(views, noisy, atol=1e-6)
    _, added = noise_matched_views(noisy, noisy, "gaussian", "minmax", torch.Generator().manual_seed(0))   # as noisy:
    assert float(added.max()) < 0.25 * float(noise_sigma(noisy).square().min())   # the estimates' scatter only


def test_the_loss_is_the_classifier_s_cross_entropy_on_noise_matched_views(separable_data, noisy_target, tmp_path):
    cfg = adapt_config(separable_data, noisy_target, tmp_path / "run", "--model.tasks=[classification,noisematch]")
    batch = first_batch(cfg)
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=10)
    model.eval()   # BatchNorm as a fixed map, so the pass by hand matches the model's
    out = model(batch["image"], batch)
    _, seed = ViewCounter().next_seed(VIEW_SEED_KEY)
    views, added = noise_matched_views(batch["image"], batch[TARGET_DOMAIN]["image"], "poisson_gaussian", "minmax",
                                       torch.Generator().manual_seed(seed))
    assert float(added.mean((1, 2, 3)).min()) > 0.25 * float(noise_sigma(batch[TARGET_DOMAIN]["image"]).square().min())
    with torch.no_grad():
        logits = model.heads["classification"](global_pool(model.encoder(views)))
    assert torch.allclose(out["noisematch_logits"], logits, atol=1e-5)
    loss = model.task_specs["noisematch"].loss(out, batch["image"], batch)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, batch["label"])), rel=1e-5)


def test_target_labels_never_reach_noisematch(separable_data, noisy_target, tmp_path):
    permuted = write_noisy_target(tmp_path / "permuted", permute_labels=True)
    (l0, g0), (l1, g1) = (first_step(separable_data, target, tmp_path, "--model.tasks=[classification,mmd,noisematch]")
                          for target in (noisy_target, permuted))
    assert l0["noisematch"] > 0 and l0 == l1
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_options_are_refused_naming_the_key(separable_data, noisy_target, tmp_path):
    with pytest.raises(ValueError, match="model.task_options.noisematch.renormalise"):
        adapt_config(separable_data, noisy_target, tmp_path / "run", "--model.tasks=[classification,noisematch]",
                     "--model.task_options.noisematch.renormalise=minmax")
    with pytest.raises(ValueError, match="model.task_options.noisematch.renormalize='zscore'"):
        NoiseMatchConfig(renormalize="zscore")
    with pytest.raises(ValueError, match="model.task_options.noisematch.model='poisson'"):
        NoiseMatchConfig(model="poisson")
    cfg = adapt_config(separable_data, noisy_target, tmp_path / "run", "--model.tasks=[noisematch]")
    batch = first_batch(cfg)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=10)
    with pytest.raises(ValueError, match="task noisematch .* add task classification"):
        model(batch["image"], batch)


@pytest.mark.slow
def test_noisematch_with_mmd_on_two_ranks_resumes_exactly_from_a_sigkill(tmp_path, launch, venv_bin, separable_data,
                                                                         noisy_target):
    got, _ = whole_and_resumed(launch, venv_bin, separable_data, noisy_target, tmp_path,
                               "--model.tasks=[classification,mmd,noisematch]")
    assert int(got["heads.noisematch.batches_seen"]) == EPOCHS * BATCHES
