"""ADDA (inverted-label GAN loss, frozen source encoder) and AdaMatch-style self-training: their gradients and
pseudo-labels against the formulas, views that replay, target labels that never matter, and a 2-rank run with
DataLoader workers that resumes exactly from a SIGKILL."""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlscale import preemption
from dlscale.distributed import DistInfo
from dlscale.train.model import build_run_model
from dlscale.train.sources import TARGET_DOMAIN, training_source
from dlscale.train.selection import (average_thresholded_confidence, batch_nuclear_norm, deep_embedded_validation,
                                     importance_weights, information_maximisation_score,
                                     soft_neighbourhood_density)
from dlscale.train.tasks.adaptation import mmd_loss, sinkhorn_loss
from dlscale.train.tasks.infomax import information_maximisation
from dlscale.train.tasks.randomisation import InstrumentViewConfig, gaussian_blur, instrument_view
from dlscale.train.tasks.selftraining import SelfTrainConfig, adamatch_ramp, pseudo_labels, strong_view

sys.path.insert(0, str(Path(__file__).parent))
from test_adapt import BATCHES, EPOCHS, KILL_AT_STEP, TIMEOUT_S, adapt_config, two_ranks, write_target  # noqa: E402


@pytest.fixture(scope="module")
def target_data(tmp_path_factory) -> Path:
    return write_target(tmp_path_factory.mktemp("target") / "data")


def first_batch(cfg):
    source = training_source(cfg)
    stream, _ = source.open(DistInfo(0, 1, 0), torch.device("cpu"))
    return next(iter(source.loader(stream)))


def test_adda_trains_the_encoder_on_inverted_labels_and_the_discriminator_on_true_ones(separable_data, target_data,
                                                                                       tmp_path):
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", "--model.tasks=[adda]",
                       "--model.task_options.adda.spectral_norm=false")   # (its power iteration moves per call)
    batch = first_batch(cfg)
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=10)
    head = model.heads["adda"]
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    out = model(batch["image"], batch)
    assert bool(head.copied)   # the first training pass froze the encoder, as it was before, as the source encoder
    frozen = head.source_encoder.state_dict()
    assert frozen.keys() == before.keys() and all(torch.equal(frozen[k], v) for k, v in before.items())
    assert not torch.equal(model.encoder.state_dict()["0.1.running_mean"], before["0.1.running_mean"])
    assert not any(n.startswith("heads.adda.source_encoder") for n, _ in model.named_parameters())
    model.task_specs["adda"].loss(out, batch["image"], batch).backward()
    got_encoder = {n: p.grad.clone() for n, p in model.encoder.named_parameters()}
    got_critic = {n: p.grad.clone() for n, p in head.discriminator.named_parameters()}

    model.zero_grad()   # by hand: the encoder's term alone for the encoder, the critic's terms alone for the critic
    critic = head.discriminator
    target = model.features(torch.cat([batch["image"], batch[TARGET_DOMAIN]["image"]]))[len(batch["image"]):]
    with torch.no_grad():
        source = head.source_encoder.eval()(batch["image"]).mean((2, 3))
    F.binary_cross_entropy_with_logits(critic(target), torch.ones(len(target))).backward(inputs=list(
        model.encoder.parameters()))
    want_encoder = {n: p.grad.clone() for n, p in model.encoder.named_parameters()}
    critic_loss = (F.binary_cross_entropy_with_logits(critic(source), torch.ones(len(source))) +
                   F.binary_cross_entropy_with_logits(critic(target.detach()), torch.zeros(len(target)))) / 2
    critic_loss.backward(inputs=list(critic.parameters()))
    assert all(torch.allclose(got_encoder[n], want_encoder[n], atol=1e-5) for n in want_encoder)
    assert all(torch.allclose(got_critic[n], p.grad, atol=1e-5) for n, p in critic.named_parameters())


def test_pseudo_labels_are_aligned_to_the_labelled_distribution_and_thresholded_relative_to_its_confidence():
    source = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    target = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    ratio = source.mean(0) / target.mean(0)
    aligned = target * ratio / (target * ratio).sum(1, keepdim=True)
    labels, mask = pseudo_labels(source, target, threshold=0.7, align=True)
    assert labels.tolist() == aligned.argmax(1).tolist()
    assert mask.tolist() == (aligned.max(1).values >= 0.7 * 0.8).tolist()
    labels, mask = pseudo_labels(source, target, threshold=0.7, align=False)
    assert labels.tolist() == [0, 0, 2] and mask.tolist() == [True, False, True]   # 0.6 >= 0.56, 0.5 < 0.56


def test_strong_views_replay_from_their_seed_and_change_the_images():
    images = torch.rand(6, 1, 16, 16)
    o = SelfTrainConfig()
    a, b = (strong_view(images, o, torch.Generator().manual_seed(3)) for _ in range(2))
    c = strong_view(images, o, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == images.shape
    assert not torch.allclose(a, images, atol=1e-2)
    plain = strong_view(images, SelfTrainConfig(max_shift=0, flux_scale=0.0, noise=0.0),
                        torch.Generator().manual_seed(3))   # a dihedral element only: the same pixel values
    assert torch.equal(plain.flatten(1).sort(1).values, images.flatten(1).sort(1).values)


def test_adamatch_ramp():
    assert [adamatch_ramp(p) for p in (0.0, 0.25, 0.5, 0.9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("task", ["selftrain", "shot", "instrument"])
def test_a_task_working_through_the_classifier_is_refused_without_it_naming_the_task(separable_data, target_data,
                                                                                     tmp_path, task):
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", f"--model.tasks=[{task}]")
    batch = first_batch(cfg)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=10)
    with pytest.raises(ValueError, match=f"task {task} .* add task classification"):
        model(batch["image"], batch)


def test_target_labels_never_reach_adda_selftrain_or_shot(separable_data, target_data, tmp_path):
    permuted = write_target(tmp_path / "permuted", permute_labels=True)
    (l0, g0), (l1, g1) = (first_step(separable_data, target, tmp_path, "--model.tasks=[classification,adda,"
                                     "selftrain,shot,instrument]", "--model.task_options.selftrain.threshold=0.3")
                          for target in (target_data, permuted))
    assert l0["selftrain"] > 0 and l0["shot"] > 0 and l0["instrument"] > 0 and l0 == l1
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def first_step(data: Path, target: Path, tmp_path: Path, *args: str) -> tuple[dict, dict]:
    """(each task's loss, every parameter's gradient) of a fresh model's first training batch (seed 0; selftrain's
    ramp, if it trains, past its start so its loss counts)."""
    cfg = adapt_config(data, target, tmp_path / "run", *args)
    batch = first_batch(cfg)
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=4)
    if "selftrain" in model.heads:
        model.heads["selftrain"].batches_seen.fill_(3)
    out = model(batch["image"], batch)
    losses = model.losses(out, batch["image"], batch)
    sum(losses.values()).backward()
    return ({k: float(v.detach()) for k, v in losses.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def test_information_maximisation_is_mean_entropy_plus_the_diversity_term():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.5]])
    p = torch.softmax(logits, 1)
    entropy = -(p * p.log()).sum(1).mean()
    mean = p.mean(0)
    diversity = np.log(3) + (mean * mean.log()).sum()
    assert float(information_maximisation(logits, 0.7)) == pytest.approx(float(entropy + 0.7 * diversity), abs=1e-6)
    confident_and_balanced = torch.eye(3) * 50
    assert float(information_maximisation(confident_and_balanced, 1.0)) == pytest.approx(0.0, abs=1e-5)
    one_class = torch.tensor([[50.0, 0, 0]] * 3)   # confident, but all one class: the diversity term is log 3
    assert float(information_maximisation(one_class, 1.0)) == pytest.approx(np.log(3), abs=1e-5)


def test_sinkhorn_is_geomloss_s_divergence_on_features_in_units_of_their_spread():
    from geomloss import SamplesLoss
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(size=(24, 6)), dtype=torch.float32)
    b = torch.tensor(rng.normal(size=(20, 6)) + [1.5, 0, 0, 0, 0, 0], dtype=torch.float32)
    both = torch.cat([a, b])
    scale = torch.cdist(both, both).square().mean().sqrt()
    want = SamplesLoss("sinkhorn", p=2, blur=0.2)(a / scale, b / scale)
    assert float(sinkhorn_loss(a, b, 0.2)) == pytest.approx(float(want), rel=1e-5)
    assert float(sinkhorn_loss(a * 30, b * 30, 0.2)) == pytest.approx(float(want), rel=1e-4)   # the features' scale
    assert float(sinkhorn_loss(a, a, 0.2)) == pytest.approx(0.0, abs=1e-6)                       # debiased
    assert float(sinkhorn_loss(a, a + 0.1, 0.2)) < float(want)


def ring(n: int = 4, side: int = 32, radius: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    y, x = torch.meshgrid(torch.arange(side) - (side - 1) / 2, torch.arange(side) - (side - 1) / 2, indexing="ij")
    r = (x.square() + y.square()).sqrt()
    return torch.exp(-(r - radius).square() / 2).expand(n, 1, side, side).clone(), r


def test_instrument_views_replay_from_their_seed_and_change_the_ring_s_scale_not_its_centre():
    images, r = ring()
    o = InstrumentViewConfig()
    a, b = (instrument_view(images, o, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, instrument_view(images, o, torch.Generator().manual_seed(6)))
    zoom_only = InstrumentViewConfig(max_zoom=1.4, max_blur=0.0, flux_scale=0.0, noise=0.0)
    views = instrument_view(images, zoom_only, torch.Generator().manual_seed(0))
    radii = (views * r).flatten(1).sum(1) / views.flatten(1).sum(1)
    assert float(radii.min()) > 8 / 1.45 and float(radii.max()) < 8 * 1.45 and float(radii.std()) > 0.3
    centre = (views * torch.arange(32.0)).flatten(1).sum(1) / views.flatten(1).sum(1)
    assert torch.allclose(centre, torch.full_like(centre, 15.5), atol=0.05)   # about the centre: the lens stays
    none = InstrumentViewConfig(max_zoom=1.0, max_blur=0.0, flux_scale=0.0, noise=0.0)
    assert torch.allclose(instrument_view(images, none, torch.Generator().manual_seed(0)), images, atol=1e-5)


def test_the_psf_blur_keeps_the_flux_and_widens_the_ring_by_its_sigma():
    images, r = ring(2)
    blurred = gaussian_blur(images, torch.tensor([0.0, 2.0]), radius=6)
    assert torch.allclose(blurred[0], images[0], atol=1e-6)
    assert float(blurred[1].sum()) == pytest.approx(float(images[1].sum()), rel=1e-3)
    width = lambda im: float((im * (r - 8).square()).sum() / im.sum())   # noqa: E731  (the ring's variance)
    assert width(blurred[1]) == pytest.approx(width(images[1]) + 4.0, rel=0.1)   # variances add: 1 + 2^2


@pytest.mark.parametrize("frozen", [True, False])
def test_shot_s_gradient_reaches_the_classifier_only_when_it_is_not_frozen(separable_data, target_data, tmp_path,
                                                                            frozen):
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", "--model.tasks=[classification,shot]",
                       "--model.domain_batchnorm=separate", f"--model.task_options.shot.freeze_classifier={frozen}")
    batch = first_batch(cfg)
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=10)
    out = model(batch["image"], batch)
    model.task_specs["shot"].loss(out, batch["image"], batch).backward()
    classifier = model.heads["classification"].linear
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.encoder.parameters())
    assert (classifier.weight.grad is None) == frozen
    with torch.no_grad():   # the target's logits: the classifier on the target images encoded alone
        want = model.heads["classification"](model.features(batch[TARGET_DOMAIN]["image"]))
    assert torch.allclose(out["shot_logits"], want, atol=1e-5)


# ---- 2 ranks, workers, a SIGKILL and a resume ---------------------------------------------------------------------

METHOD_ARGS = ("--model.tasks=[classification,adda,selftrain,shot,instrument,sinkhorn]", "--optim.encoder_lr_scale=0.1",
               "--model.task_options.selftrain.threshold=0.5", "--model.task_options.shot.diversity=2",
               "--model.domain_batchnorm=separate", "--model.task_options.classification.probe_init=true")


def whole_and_resumed(launch, venv_bin, data: Path, target: Path, tmp_path: Path, *args: str) -> tuple[dict, dict]:
    """(model.pt of a 2-rank run SIGKILLed in its last epoch and resumed, model.pt of the same run uninterrupted)."""
    whole = launch(two_ranks(venv_bin, data, target, tmp_path / "whole", *args), tmp_path / "whole.log", tmp_path)
    killed = launch(two_ranks(venv_bin, data, target, tmp_path / "killed", *args), tmp_path / "killed.log", tmp_path,
                    env={preemption.DRILL: f"{KILL_AT_STEP}:SIGKILL"})
    assert killed.wait(TIMEOUT_S) != 0, killed.output()[-4000:]
    assert whole.wait(TIMEOUT_S) == 0, whole.output()[-4000:]
    resumed = launch(two_ranks(venv_bin, data, target, tmp_path / "killed", *args, "--resume", "auto"),
                     tmp_path / "resumed.log", tmp_path)
    assert resumed.wait(TIMEOUT_S) == 0, resumed.output()[-4000:]
    got = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    want = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    assert [k for k, v in got.items() if torch.is_tensor(v) and not torch.equal(v, want[k])] == []
    assert not np.isnan(float(got["heads.classification.linear.weight"].sum()))
    return got, want


@pytest.mark.slow
def test_adda_selftrain_and_shot_on_two_ranks_resume_exactly_from_a_sigkill(tmp_path, launch, venv_bin, separable_data,
                                                                       target_data):
    got, _ = whole_and_resumed(launch, venv_bin, separable_data, target_data, tmp_path, *METHOD_ARGS)
    assert int(got["heads.selftrain.batches_seen"]) == EPOCHS * BATCHES and bool(got["heads.adda.copied"])
    assert int(got["heads.instrument.batches_seen"]) == EPOCHS * BATCHES


# ---- label-free model selection -----------------------------------------------------------------------------------

def test_dev_is_the_importance_weighted_loss_with_its_control_variate():
    rng = np.random.default_rng(0)
    w, loss = rng.uniform(0.2, 3, 50), rng.uniform(0, 2, 50)
    eta = -np.cov(w * loss, w)[0, 1] / np.var(w, ddof=1)
    assert deep_embedded_validation(w, loss) == pytest.approx((w * loss).mean() + eta * w.mean() - eta)
    assert deep_embedded_validation(np.ones(50), loss) == pytest.approx(loss.mean())   # no shift: the plain loss


def test_importance_weights_favour_validation_images_that_look_like_the_target():
    rng = np.random.default_rng(1)
    source, target = rng.normal(size=(300, 4)), rng.normal(size=(200, 4)) + [2, 0, 0, 0]
    w = importance_weights(source, target, np.array([[2.0, 0, 0, 0], [-2.0, 0, 0, 0]]))
    assert w[0] > 5 * w[1]
    same = importance_weights(source, rng.normal(size=(300, 4)), source[:50])
    assert np.abs(np.log(same)).mean() < 0.5   # no shift: weights near 1


def calibrated(rng, n: int, sharpness: float) -> dict:
    """Class probabilities of a calibrated 3-class model and labels drawn from them (its accuracy grows with
    `sharpness`)."""
    logits = sharpness * rng.normal(size=(n, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    return {"probs": probs, "labels": labels, "features": rng.normal(size=(n, 4))}


def test_atc_estimates_a_calibrated_model_s_accuracy_on_unlabelled_images_and_falls_with_it():
    rng = np.random.default_rng(2)
    source, same, blurred = calibrated(rng, 2000, 3.0), calibrated(rng, 2000, 3.0), calibrated(rng, 2000, 0.5)
    accuracy = (same["probs"].argmax(1) == same["labels"]).mean()
    assert average_thresholded_confidence(source, same["probs"]) == pytest.approx(accuracy, abs=0.03)
    assert average_thresholded_confidence(source, blurred["probs"]) < accuracy - 0.3


def test_snd_prefers_predictions_in_dense_clusters_to_scattered_ones():
    rng = np.random.default_rng(3)
    centres = np.eye(3) * 0.9 + 0.05
    clustered = centres[rng.integers(3, size=300)] + rng.normal(scale=0.005, size=(300, 3)).clip(-0.04, 0.04)
    scattered = rng.dirichlet(np.ones(3), size=300)
    assert soft_neighbourhood_density(clustered) > soft_neighbourhood_density(scattered)


@pytest.mark.parametrize("rule", [information_maximisation_score, batch_nuclear_norm])
def test_im_and_bnm_prefer_confident_predictions_of_every_class_to_collapsed_or_unsure_ones(rule):
    rng = np.random.default_rng(5)
    confident = np.eye(3)[rng.integers(3, size=300)] * 0.9 + 0.1 / 3
    collapsed = np.tile([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], (300, 1))
    unsure = rng.dirichlet(np.full(3, 20.0), size=300)
    assert rule(confident) > max(rule(collapsed), rule(unsure))
    assert information_maximisation_score(collapsed) == pytest.approx(0, abs=1e-6)


def test_separate_domain_batchnorm_encodes_each_domain_alone(separable_data, target_data, tmp_path):
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", "--model.tasks=[classification,mmd]",
                       "--model.domain_batchnorm=separate")
    batch = first_batch(cfg)
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 32, 32), None)
    images, target = batch["image"], batch[TARGET_DOMAIN]["image"]
    with torch.no_grad():
        out = model(images, batch)
        alone = model.features(images), model.features(target)
        joint = model.features(torch.cat([images, target]))
    assert torch.allclose(out["features"], alone[0], atol=1e-6)
    assert torch.allclose(out["mmd"], mmd_loss(*alone), atol=1e-6)
    assert not torch.allclose(out["features"], joint[:len(images)], atol=1e-3)


def test_with_separate_domain_batchnorm_the_running_statistics_stay_the_labelled_domain_s(separable_data,
                                                                                          target_data, tmp_path):
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", "--model.tasks=[classification,selftrain,shot]",
                       "--model.domain_batchnorm=separate", "--model.task_options.selftrain.ramp=false")
    batch = first_batch(cfg)
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=10)
    labelled_only = copy.deepcopy(model)
    model(batch["image"], batch)
    labelled_only.heads["classification"](labelled_only.encoder(batch["image"]))
    got, want = model.state_dict(), labelled_only.state_dict()
    stats = [k for k in want if "running_" in k]
    assert any(".norm." in k for k in stats) and len(stats) > 2   # the encoder's and the classifier's
    assert [k for k in stats if not torch.equal(got[k], want[k])] == []
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0] == 0.1   # restored


def test_a_spectrally_normalised_dann_classifier_has_unit_spectral_norm_layers(separable_data, target_data, tmp_path):
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", "--model.tasks=[classification,dann]",
                       "--model.task_options.dann.spectral_norm=true")
    batch = first_batch(cfg)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=10)
    for _ in range(20):   # power iterations converge as the layer is used in training
        model(batch["image"], batch)
    linears = [m for m in model.heads["dann"].net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    assert all(float(torch.linalg.matrix_norm(m.weight.detach(), ord=2)) == pytest.approx(1.0, abs=0.05)
               for m in linears)
