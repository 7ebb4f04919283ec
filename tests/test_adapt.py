"""Domain adaptation (stage `adapt`): the gradient-reversal layer and Deep CORAL against their formulas, a two-stream
batch that never carries the target's labels, target-domain metrics, refusals of mismatched data, and a 2-rank run
with DataLoader workers that resumes exactly from a SIGKILL."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dlscale import preemption
from dlscale.data.classes import CLASSES
from dlscale.data.shards import DatasetWriter
from dlscale.distributed import DistInfo
from dlscale.train.config import load_config
from dlscale.train.model import build_run_model
from dlscale.train.sources import TARGET_DOMAIN, TwoStreamSource, training_source
from dlscale.train.tasks.adaptation import coral_loss, dann_coefficient, mmd_loss, reverse_gradient

sys.path.insert(0, str(Path(__file__).parent))
from conftest import separable_image  # noqa: E402

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TIMEOUT_S = 300


def write_target(out: Path, side: int = 32, splits=(("train", 120), ("val", 30)), shift: float = 0.6,
                 permute_labels: bool = False, classes=CLASSES) -> Path:
    """A shifted copy of the separable toy domain: the same class squares under a bright gradient (another
    instrument's background). `permute_labels` relabels every image (the images stay the same)."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, shift, side, dtype=np.float32)[None, None, :]
    with DatasetWriter(out, (1, side, side), {"kind": "test"}, shard_size=50, samples_per_record=8,
                       classes=tuple(classes)) as w:
        for split, n in splits:
            for i in range(n):
                label = i % 3
                image = separable_image(rng, label, side) + ramp
                stored = (label + 1) % 3 if permute_labels else label
                w.add(split, image, stored, {"class": classes[stored], "source_file": f"{split}/{i}"})
    return out


@pytest.fixture(scope="module")
def target_data(tmp_path_factory) -> Path:
    return write_target(tmp_path_factory.mktemp("target") / "data")


def adapt_config(data: Path, target: Path, run_dir: Path, *extra: str, stage: str = "adapt"):
    return load_config(None, ["--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=12",
                              "--data.num_workers=0", "--data.shuffle_buffer=48", f"--data.target.data_dir={target}",
                              *extra], stage=stage, data_dir=str(data), run_dir=str(run_dir)).validate()


# ---- the parts, against their formulas -------------------------------------------------------------------------

def test_gradient_reversal_flips_and_scales_the_gradient_of_a_logistic_domain_loss():
    torch.manual_seed(0)
    x = torch.randn(6, 4, requires_grad=True)
    w, b = torch.randn(4), torch.tensor(0.3)
    domain = torch.tensor([0., 0., 0., 1., 1., 1.])
    coefficient = 0.37
    logits = reverse_gradient(x, coefficient) @ w + b
    torch.nn.functional.binary_cross_entropy_with_logits(logits, domain).backward()
    by_hand = (torch.sigmoid(x.detach() @ w + b) - domain)[:, None] * w[None, :] / len(domain)   # dBCE/dx
    assert torch.allclose(x.grad, -coefficient * by_hand, atol=1e-6)


def test_the_dann_encoder_gradient_is_the_reversed_domain_gradient_and_the_head_s_is_not(separable_data, target_data,
                                                                                          tmp_path):
    """Through the whole model: the domain loss's gradient on the encoder equals -lambda times the gradient the same
    loss would give without the reversal layer; the domain classifier's own gradient is not reversed."""
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", "--model.tasks=[dann]",
                       "--model.task_options.dann.ramp_steps=10")
    source = training_source(cfg)
    stream, _ = source.open(DistInfo(0, 1, 0), torch.device("cpu"))
    batch = next(iter(source.loader(stream)))
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 32, 32), None, total_steps=40)
    model.heads["dann"].batches_seen.fill_(4)
    lam = float(model.task_specs["dann"].coefficient(model.heads["dann"].batches_seen))
    assert lam == pytest.approx(2 / (1 + np.exp(-10 * 0.4)) - 1, rel=1e-6)

    def grads(reverse: bool):
        model.zero_grad()
        model.heads["dann"].batches_seen.fill_(4)
        if reverse:
            out = model(batch["image"], batch)
        else:   # the same joint encoder pass with the reversal layer replaced by the identity
            feats = model.features(torch.cat([batch["image"], batch[TARGET_DOMAIN]["image"]]))
            out = {"domain_logits": model.heads["dann"](feats)}
        model.task_specs["dann"].loss(out, batch["image"], batch).backward()
        return ({n: p.grad.clone() for n, p in model.encoder.named_parameters()},
                {n: p.grad.clone() for n, p in model.heads["dann"].named_parameters()})

    (enc_r, head_r), (enc_plain, head_plain) = grads(True), grads(False)
    assert all(torch.allclose(enc_r[n], -lam * enc_plain[n], atol=1e-6) for n in enc_r)
    assert any(enc_plain[n].abs().sum() > 0 for n in enc_plain)
    assert all(torch.allclose(head_r[n], head_plain[n], atol=1e-6) for n in head_r)


def test_the_reversal_coefficient_follows_ganin_s_ramp():
    p = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0])
    expected = [2 / (1 + np.exp(-10 * min(v, 1.0))) - 1 for v in p.tolist()]
    assert dann_coefficient(p).tolist() == pytest.approx(expected, rel=1e-6)
    assert float(dann_coefficient(torch.tensor(0.0))) == 0.0


def test_coral_is_the_squared_frobenius_distance_of_covariances_over_4_d_squared():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(20, 5)), rng.normal(size=(16, 5)) * 2 + 1
    cov = lambda x: (x - x.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1)   # noqa: E731
    expected = ((cov(s) - cov(t)) ** 2).sum() / (4 * 5 ** 2)
    assert float(coral_loss(torch.tensor(s), torch.tensor(t))) == pytest.approx(expected, rel=1e-5)
    assert float(coral_loss(torch.tensor(s), torch.tensor(s + 3.0))) == pytest.approx(0.0, abs=1e-6)   # mean-blind


def test_mmd_is_the_biased_squared_mmd_under_a_sum_of_gaussian_kernels():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) + 0.5
    x = np.concatenate([s, t])
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    h = d2.mean()
    k = sum(np.exp(-d2 / (scale * h)) for scale in (0.25, 0.5, 1.0, 2.0, 4.0))
    expected = k[:12, :12].mean() + k[12:, 12:].mean() - 2 * k[:12, 12:].mean()
    assert float(mmd_loss(torch.tensor(s), torch.tensor(t))) == pytest.approx(expected, rel=1e-5)
    shifted = float(mmd_loss(torch.tensor(s), torch.tensor(s + 2.0)))   # a mean shift, which CORAL cannot see
    assert shifted > 0.5 and float(coral_loss(torch.tensor(s), torch.tensor(s + 2.0))) == pytest.approx(0, abs=1e-6)


# ---- the two-stream batch ------------------------------------------------------------------------------------------

def test_target_labels_never_reach_a_loss(separable_data, target_data, tmp_path):
    """The same target images under permuted labels give the same batches, losses and gradients."""
    permuted = write_target(tmp_path / "permuted", permute_labels=True)
    results = []
    for target in (target_data, permuted):
        cfg = adapt_config(separable_data, target, tmp_path / "run",
                           "--model.tasks=[classification,dann,coral,mmd,sinkhorn]")
        source = training_source(cfg)
        assert isinstance(source, TwoStreamSource)
        stream, _ = source.open(DistInfo(0, 1, 0), torch.device("cpu"))
        batch = next(iter(source.loader(stream)))
        assert set(batch[TARGET_DOMAIN]) == {"image", "ids"}   # no label, no metadata
        torch.manual_seed(0)
        model = build_run_model(cfg, (1, 32, 32), None, total_steps=10)
        losses = model.losses(model(batch["image"], batch), batch["image"], batch)
        sum(losses.values()).backward()
        results.append((batch, {k: float(v.detach()) for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (b0, l0, g0), (b1, l1, g1) = results
    assert torch.equal(b0[TARGET_DOMAIN]["image"], b1[TARGET_DOMAIN]["image"])
    assert l0 == l1 and g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_a_two_stream_epoch_has_the_labelled_side_s_batch_count_and_both_sides_differ(separable_data, target_data,
                                                                                       tmp_path):
    cfg = adapt_config(separable_data, target_data, tmp_path / "run")
    source = training_source(cfg)
    stream, batches = source.open(DistInfo(0, 1, 0), torch.device("cpu"))
    epoch = list(source.loader(stream))
    assert len(epoch) == batches == 240 // 12   # the labelled train split's, not the target's (120)
    assert all(b["image"].shape == b[TARGET_DOMAIN]["image"].shape == (12, 1, 32, 32) for b in epoch)
    # the target's gradient brightens the right-hand columns: the domains are told apart by their images
    right_minus_left = lambda x: float((x[..., -4:] - x[..., :4]).mean())   # noqa: E731
    assert right_minus_left(epoch[0][TARGET_DOMAIN]["image"]) > right_minus_left(epoch[0]["image"]) + 0.05


def test_plain_stages_do_not_read_the_target_stream(separable_data, target_data, tmp_path):
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", stage="supervised")
    assert not isinstance(training_source(cfg), TwoStreamSource)


# ---- refusals ----------------------------------------------------------------------------------------------------

def test_adapt_without_a_target_is_refused_naming_the_option(cli, separable_data, tmp_path, tiny_args):
    result = cli("train", "--stage", "adapt", "--data", separable_data, "--run-dir", tmp_path / "run", *tiny_args)
    assert result.code == 2 and "--target-data" in result.err and "noisematch" in result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["shape", "classes", "no_val", "no_train"])
def test_mismatched_targets_are_refused_naming_both_datasets(case, cli, separable_data, tmp_path, tiny_args):
    kwargs = {"shape": dict(side=24), "classes": dict(classes=("no_sub", "cdm", "vortex")),
              "no_val": dict(splits=(("train", 60),)), "no_train": dict(splits=(("val", 30),))}[case]
    target = write_target(tmp_path / "target", **kwargs)
    result = cli("train", "--stage", "adapt", "--data", separable_data, "--target-data", target, "--run-dir",
                 tmp_path / "run", *tiny_args)
    assert result.code == 2, result.err
    expected = {"shape": ["[1, 24, 24]", "[1, 32, 32]", "data.resize"], "classes": ["vortex", str(target)],
                "no_val": ["'val'", "data.target.evaluate=false"], "no_train": ["'train'", str(target)]}[case]
    assert all(text in result.err for text in expected), result.err
    assert not (tmp_path / "run").exists()


def test_a_target_without_val_trains_when_its_evaluation_is_off(cli, separable_data, tmp_path, tiny_args):
    target = write_target(tmp_path / "target", splits=(("train", 60),))
    result = cli("train", "--stage", "adapt", "--data", separable_data, "--target-data", target, "--run-dir",
                 tmp_path / "run", "--data.target.evaluate=false", "--schedule.epochs=1", *tiny_args)
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "val/accuracy" in metrics and not any(k.startswith("target/") for k in metrics)


# ---- a real run: 2 ranks, DataLoader workers, a SIGKILL and a resume ---------------------------------------------

EPOCHS, BATCHES = 3, 240 // (12 * 2)
KILL_AT_STEP = 2 * BATCHES + 3   # in the last epoch; the newest complete checkpoint is that of step KILL_AT_STEP - 1


def two_ranks(venv_bin, data, target, run_dir: Path, *extra) -> list:
    return [venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT, "--stage", "adapt",
            "--data", data, "--target-data", target, "--run-dir", run_dir, "--model.encoder.name=small",
            "--model.encoder.width=8", "--data.batch_size=12", "--data.num_workers=2", "--data.shuffle_buffer=48",
            "--model.tasks=[classification,dann,coral]", f"--schedule.epochs={EPOCHS}", "--schedule.log_every=2",
            "--schedule.checkpoint_every=2", "--eval.n_bootstrap=10", "--eval.probe_samples=60",
            "--data.target.adabn=true", "--data.target.head=em", *extra]


@pytest.fixture(scope="module")
def adapt_runs(tmp_path_factory, launch, venv_bin, separable_data, target_data):
    """An uninterrupted 2-rank adapt run and one SIGKILLed in its last epoch, started together."""
    root = tmp_path_factory.mktemp("adapt")
    whole = launch(two_ranks(venv_bin, separable_data, target_data, root / "whole"), root / "whole.log", root)
    killed = launch(two_ranks(venv_bin, separable_data, target_data, root / "killed"), root / "killed.log", root,
                    env={preemption.DRILL: f"{KILL_AT_STEP}:SIGKILL"})
    assert killed.wait(TIMEOUT_S) != 0, killed.output()[-4000:]
    assert whole.wait(TIMEOUT_S) == 0, whole.output()[-4000:]
    return root, whole


@pytest.mark.slow
def test_an_adapt_run_reports_both_domains_in_metrics_tensorboard_and_the_table(adapt_runs):
    root, whole = adapt_runs
    metrics = json.loads((root / "whole" / "metrics.json").read_text())
    assert metrics["step"] == EPOCHS * BATCHES and metrics["val/n_samples"] == 61
    assert metrics["target/val/n_samples"] == 30
    for key in ("target/val/accuracy", "target/val/auc_macro", *(f"target/val/auc/{c}" for c in CLASSES),
                "adabn/target/val/auc_macro",
                "target/probe/auc_macro", "target_data/skipped_shards", "train/weight_dann"):
        assert key in metrics, key
    assert (root / "whole" / "roc_target_val.png").is_file() and (root / "whole" / "scores_target_val.npz").is_file()
    assert re.search(r"target domain \(.*\):\n  samples +30\n  accuracy", whole.output())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(root / "whole" / "tb"))
    tb.Reload()
    assert {"target/val/auc_macro", "train/loss_dann", "train/loss_coral"} <= set(tb.Tags()["scalars"])


@pytest.mark.slow
def test_target_metrics_equal_dlscale_eval_of_the_exported_model_on_the_target(adapt_runs, cli, target_data):
    root, _ = adapt_runs
    metrics = json.loads((root / "whole" / "metrics.json").read_text())
    result = cli("eval", "--run-dir", root / "whole", "--data", target_data)
    assert result.code == 0, result.err
    evaluated = json.loads((root / "whole" / "eval" / "data-val" / "metrics.json").read_text())
    for key in ("accuracy", "auc_macro", "ece", *(f"auc/{c}" for c in CLASSES)):
        assert evaluated[f"val/{key}"] == metrics[f"target/val/{key}"], key


@pytest.mark.slow
def test_a_killed_adapt_run_resumes_to_the_parameters_of_an_uninterrupted_one(adapt_runs, launch, venv_bin,
                                                                             separable_data, target_data):
    root, _ = adapt_runs
    run = root / "killed"
    assert not (run / "model.pt").exists()
    assert int((run / "checkpoints" / "latest").read_text().strip()[4:]) == KILL_AT_STEP - 1
    resumed = launch(two_ranks(venv_bin, separable_data, target_data, run, "--resume", "auto"),
                     root / "resumed.log", root)
    assert resumed.wait(TIMEOUT_S) == 0, resumed.output()[-4000:]
    got = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(root / "whole" / "model.pt", weights_only=True)
    assert got.keys() == want.keys() and "heads.dann.batches_seen" in got
    assert int(got["heads.dann.batches_seen"]) == EPOCHS * BATCHES
    assert [k for k, v in got.items() if torch.is_tensor(v) and not torch.equal(v, want[k])] == []
    adapted = torch.load(run / "adabn" / "model.pt", weights_only=True)   # the AdaBN step, after the resume too
    assert all(torch.equal(v, torch.load(root / "whole" / "adabn" / "model.pt", weights_only=True)[k])
               for k, v in adapted.items())
    heads = [json.loads((r / "adabn" / "adabn.json").read_text())["head"] for r in (run, root / "whole")]
    assert heads[0] == heads[1] and heads[0]["kind"] == "em"   # the head refit too


@pytest.mark.slow
def test_the_shipped_adapt_sweep_tunes_the_adaptation_strength_ranked_on_the_target(cli, separable_data, target_data,
                                                                                   tmp_path):
    """`dlscale tune --config dlscale/sweep/adapt.yaml`: real trials of stage adapt, ranked on target/val."""
    import csv
    out = tmp_path / "out"
    result = cli("tune", "--config", Path(__file__).resolve().parents[1] / "dlscale" / "sweep" / "adapt.yaml",
                 "--data", separable_data, f"--data.target.data_dir={target_data}", "--out", out, "--trials", "2",
                 "--sweep.scheduler=fifo", "--cpus-per-trial", "2", "--model.encoder.name=small",
                 "--model.encoder.width=8", "--deepspeed.precision=fp32", "--data.batch_size=16",
                 "--data.num_workers=0", "--data.shuffle_buffer=48", "--schedule.epochs=1",
                 "--schedule.batches_per_epoch=3", "--eval.probe_samples=32", "--eval.n_bootstrap=5")
    assert result.code == 0, result.err[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    assert "target/val/auc_macro" in (out / "results.md").read_text()
    weights = {float(r["loss.fixed.weights.mmd"]) for r in rows}
    assert len(weights) == 2 and all(0.1 <= w <= 2.0 for w in weights)


def test_a_simulated_target_adapts_records_its_stream_and_is_scored_on_its_own_simulated_set(cli, separable_data,
                                                                                               tmp_path, tiny_args):
    run = tmp_path / "run"
    result = cli("train", "--stage", "adapt", "--data", separable_data, "--run-dir", run, "--schedule.epochs=1",
                 "--data.target.source=simulate", "--data.target.simulator.overrides={instrument.n_pix: 32}",
                 "--data.target.simulator.eval_per_class=8", "--data.target.simulator.probe_per_class=8", *tiny_args)
    assert result.code == 0, result.err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["target/val/n_samples"] == 24 and metrics["val/n_samples"] == 61
    simulation = json.loads((run / "simulation.json").read_text())
    assert set(simulation) == {"target"} and simulation["target"]["source"]["preset"] == "model_iii"
    assert simulation["target"]["seed"] not in (0, None)   # its own seed, not the labelled side's
    assert f"data_dir: {run / 'target_eval_data'}" in (run / "config.yaml").read_text()
    manifest = json.loads((run / "target_eval_data" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["samples"] == 24 and manifest["image_shape"] == [1, 32, 32]


@pytest.mark.parametrize(("override", "key"), [
    ("--data.target.simulator.preset=model_x", "data.target.simulator.preset"),
    ("--data.target.simulator.overrides={source.magnitude: -80}", "data.target.simulator.overrides"),
    ("--data.target.source=disk", "data.target.source"),
])
def test_a_bad_target_setting_is_refused_naming_its_own_key(cli, separable_data, tmp_path, tiny_args, override, key):
    result = cli("train", "--stage", "adapt", "--data", separable_data, "--run-dir", tmp_path / "run",
                 "--data.target.source=simulate", override, *tiny_args)
    assert result.code == 2 and key in result.err, result.err
    assert not (tmp_path / "run").exists()


def test_both_domains_pass_the_encoder_together_so_batchnorm_sees_one_statistic(separable_data, target_data,
                                                                                 tmp_path):
    """The labelled and target images are encoded in one pass: the model's outputs equal those of encoding the
    concatenated batch (train-mode BatchNorm), not those of encoding each domain alone."""
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", "--model.tasks=[classification,coral]")
    source = training_source(cfg)
    stream, _ = source.open(DistInfo(0, 1, 0), torch.device("cpu"))
    batch = next(iter(source.loader(stream)))
    torch.manual_seed(0)
    model = build_run_model(cfg, (1, 32, 32), None)
    images, target = batch["image"], batch[TARGET_DOMAIN]["image"]
    with torch.no_grad():
        out = model(images, batch)
        joint = model.features(torch.cat([images, target]))
        alone = model.features(images), model.features(target)
    assert torch.allclose(out["features"], joint[:len(images)], atol=1e-6)
    assert torch.allclose(out["coral"], coral_loss(joint[:len(images)], joint[len(images):]), atol=1e-6)
    assert not torch.allclose(out["features"], alone[0], atol=1e-3)   # alone: another normalisation


def test_with_device_transforms_the_target_images_are_finished_on_the_device_too(separable_data, target_data,
                                                                                  tmp_path):
    """data.transforms=device: workers hand both domains' images over raw; `finish_batch` normalises both."""
    from dlscale.data.transforms import RAW, finish_batch
    cfg = adapt_config(separable_data, target_data, tmp_path / "run", "--data.transforms=device")
    source = training_source(cfg)
    stream, _ = source.open(DistInfo(0, 1, 0), torch.device("cpu"))
    raw = next(iter(source.loader(stream)))
    assert RAW in raw and RAW in raw[TARGET_DOMAIN] and float(raw[TARGET_DOMAIN]["image"].max()) > 1.2
    done = finish_batch(raw, cfg.data, torch.device("cpu"))
    for images in (done["image"], done[TARGET_DOMAIN]["image"]):   # per-image minmax: each spans [0, 1]
        assert RAW not in done and torch.allclose(images.amax((1, 2, 3)), torch.ones(len(images)))
        assert torch.allclose(images.amin((1, 2, 3)), torch.zeros(len(images)))
