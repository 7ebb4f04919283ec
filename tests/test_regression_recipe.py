"""The regression head's recipe: its loss on the standardised targets, test-time augmentation over the dihedral
views (the mean of the regression head's outputs and of the classifier's probabilities, exact whatever the
DataLoader workers and ranks of the evaluation), and the transfer study's step floor and regression options carried
into its runs."""
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from dlscale.cli import main
from runs import own_logging

BOTH_HEADS = ["--stage", "multitask", "--model.tasks=[classification,regression]", "--data.targets=[theta_E]",
              "--eval.probe_samples=0"]


def train(*argv) -> Path:
    with own_logging():
        assert main(["train", *map(str, argv)]) == 0
    return Path(argv[argv.index("--run-dir") + 1])


@pytest.fixture(scope="module")
def tta_run(separable_data, tiny_args, tmp_path_factory) -> Path:
    """A few steps of a classification + regression run whose evaluation averages both over the dihedral views."""
    run = tmp_path_factory.mktemp("recipe") / "tta"
    return train(*BOTH_HEADS, "--data", separable_data, "--run-dir", run, *tiny_args, "--schedule.epochs=1",
                 "--schedule.batches_per_epoch=4",
                 "--model.task_options.regression.tta=true", "--model.task_options.regression.loss=huber",
                 "--model.task_options.classification.tta=true")


def _symmetries(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 elements of the dihedral group applied to square images, written out independently of dlscale."""
    rotations = [images.rot90(k, (-2, -1)) for k in range(4)]
    return rotations + [r.flip(-1) for r in rotations]


def test_tta_prediction_is_the_mean_of_the_head_over_the_8_dihedral_views(tta_run):
    from dlscale.train.evaluation import load_run
    cfg, model, _ = load_run(tta_run)
    assert cfg.model.task_options["regression"].tta is True
    model.eval()
    images = torch.rand(5, 1, 32, 32)
    head = model.heads["regression"]
    with torch.no_grad():
        tta = model(images)["regression"]
        views = torch.stack([head(model.encoder(v)) for v in _symmetries(images)])
        plain = head(model.encoder(images))
    assert torch.allclose(tta, views.mean(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tta, plain, rtol=1e-3, atol=1e-4)   # the views differ: averaging them changes it
    with torch.no_grad():   # training batches are never averaged: the loss sees the augmented image itself
        batch = {"target": torch.zeros(5, 1)}
        assert torch.equal(model.train()(images, batch)["regression"], head(model.encoder(images)))


def test_classification_tta_probabilities_are_the_mean_softmax_over_the_8_dihedral_views(separable_data, tiny_args,
                                                                                           tmp_path):
    from dlscale.train.evaluation import load_run
    run = train("--stage", "supervised", "--data", separable_data, "--run-dir", tmp_path / "cls", *tiny_args,
                "--schedule.epochs=1", "--schedule.batches_per_epoch=2",
                "--model.task_options.classification.tta=true")
    _, model, _ = load_run(run)
    model.eval()
    images = torch.rand(5, 1, 32, 32)
    head = model.heads["classification"]
    with torch.no_grad():
        probs = model.collect(model(images), images, {})["probs"]
        views = torch.stack([torch.softmax(head(model.encoder(v)), -1) for v in _symmetries(images)])
        plain = torch.softmax(head(model.encoder(images)), -1)
    assert torch.allclose(probs, views.mean(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probs, plain, rtol=1e-3, atol=1e-5)
    with np.load(run / "scores_val.npz") as npz:   # the run's own evaluation scored with it: probabilities sum to 1
        assert np.allclose(npz["probs"].sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("loss, direct", [
    ("mse", lambda p, t: ((p - t) ** 2).mean()),
    ("l1", lambda p, t: (p - t).abs().mean()),
    ("huber", lambda p, t: torch.where((p - t).abs() < 1, 0.5 * (p - t) ** 2, (p - t).abs() - 0.5).mean()),
])
def test_each_regression_loss_equals_its_direct_computation_on_the_standardised_targets(loss, direct):
    from dlscale.train.tasks.base import TaskContext
    from dlscale.train.tasks.supervised import Regression, RegressionConfig
    stats = {"mean": [2.0, -1.0], "std": [0.5, 4.0]}
    task = Regression(TaskContext((1, 8, 8), 4, 1, targets=("a", "b"), target_stats=stats,
                                  options=RegressionConfig(loss=loss)))
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(64, 2, generator=g) * 2, torch.randn(64, 2, generator=g) * 3 + 1
    standardised = (target - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])
    got = task.loss({"regression": pred}, None, {"target": target})
    assert torch.allclose(got, direct(pred, standardised), rtol=1e-6)
    assert (standardised - pred).abs().max() > 1   # some errors beyond Huber's delta: its linear part is tested


def test_bad_regression_options_are_refused_naming_the_key(separable_data):
    from dlscale.train.config import load_config
    from dlscale.transfer.config import load_transfer_config
    with pytest.raises(ValueError, match=r"model\.task_options\.regression\.loss='l2': expected one of mse, huber"):
        load_config(None, ["model.task_options.regression.loss=l2"], stage="multitask", data_dir=str(separable_data))
    with pytest.raises(ValueError, match=r"^task_options\.regression\.loss='mae': expected one of mse, huber, l1"):
        load_transfer_config(None, ["task_options.regression.loss=mae"], complete=False)
    with pytest.raises(ValueError, match=r"budget\.min_steps=-1"):
        load_transfer_config(None, ["budget.min_steps=-1"], complete=False)
    with pytest.raises(ValueError, match=r"task_options\.regression\.tta"):
        load_transfer_config(None, ["task_options.regression.tta=sometimes"], complete=False)


@pytest.mark.parametrize("min_steps, epochs, n_train, expected", [
    (0, 4, 60, 5),        # the floor of an epoch (min_batches_per_epoch)
    (0, 4, 800, 25),      # the subset once per epoch: 800 / (16 x 2)
    (300, 4, 60, 75),     # the step floor: 300 steps over 4 epochs
    (301, 4, 800, 76),    # rounded up: at least min_steps
])
def test_min_steps_is_a_floor_of_every_trained_run_s_steps(min_steps, epochs, n_train, expected, separable_data,
                                                            tmp_path):
    from dlscale.models.backbone import EncoderConfig
    from dlscale.transfer.config import load_transfer_config
    from dlscale.transfer.training import run_config
    cfg = load_transfer_config(None, [f"budget.min_steps={min_steps}", f"budget.epochs={epochs}",
                                      "data.batch_size=16", "ranks=2"], complete=False)
    study = SimpleNamespace(cfg=cfg, stream=lambda source: cfg.data)
    source = SimpleNamespace(path=None, architecture=EncoderConfig(name="small", width=8))
    run = run_config(study, source, "scratch", n_train, tmp_path, str(separable_data), 0)
    assert (run.schedule.epochs, run.schedule.batches_per_epoch) == (epochs, expected)


# ---- evaluation with TTA: exact for any workers and ranks ---------------------------------------------------------

def _with_workers(run: Path, where: Path, workers: int, tta: bool = True) -> Path:
    copy = where / f"w{workers}_tta{int(tta)}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["num_workers"] = workers
    for task in ("regression", "classification"):
        cfg["model"]["task_options"][task]["tta"] = tta
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


@pytest.mark.slow   # dlscale eval in 4 processes, one of them 2 ranks under torchrun
def test_tta_scores_of_both_heads_are_bitwise_equal_for_0_or_2_workers_and_1_or_2_ranks(tta_run, venv_bin,
                                                                                          free_ports, tmp_path):
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    scores = {}
    for workers, ranks, tta in [(0, 1, True), (2, 1, True), (2, 2, True), (0, 1, False)]:
        run = _with_workers(tta_run, tmp_path / f"r{ranks}", workers, tta)
        prefix = [venv_bin / "torchrun", "--nnodes=1", "--nproc_per_node=2", f"--master_port={free_ports(1)[0]}",
                  "--master_addr=127.0.0.1", "-m", "dlscale.cli"] if ranks == 2 else [venv_bin / "dlscale"]
        done = subprocess.run([str(a) for a in [*prefix, "eval", "--run-dir", run]], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env={**_base_env(), **env})
        assert done.returncode == 0, done.stderr[-3000:]
        with np.load(run / "scores_val.npz") as npz:
            scores[(workers, ranks, tta)] = {k: npz[k] for k in npz.files}
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["val/n_samples"] == 61
    reference = scores[(0, 1, True)]
    for key in [(2, 1, True), (2, 2, True)]:
        assert scores[key].keys() == reference.keys()
        for name in reference:
            assert np.array_equal(scores[key][name], reference[name]), f"workers, ranks, tta = {key}: {name} differs"
    plain = scores[(0, 1, False)]
    assert np.array_equal(plain["target"], reference["target"])
    for name in ("regression", "probs"):
        assert not np.allclose(plain[name], reference[name], rtol=1e-4, atol=1e-6), name


def _base_env() -> dict:
    import os
    from conftest import RANK_VARIABLES
    return {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}


# ---- the transfer study carries its regression options into the runs ----------------------------------------------

def test_the_study_s_regression_options_reach_the_runs_tta_and_augmentation_only_for_invariant_targets(
        tmp_path, separable_data):
    from dlscale.models.backbone import EncoderConfig
    from dlscale.transfer.config import load_transfer_config
    from dlscale.transfer.tasks.regression_runs import head_options
    from dlscale.transfer.training import run_config
    cfg = load_transfer_config(None, ["task_options.regression.loss=huber"], complete=False)
    study = SimpleNamespace(cfg=cfg, stream=lambda source: cfg.data)
    source = SimpleNamespace(path=None, architecture=EncoderConfig(name="small", width=8))
    for names, tta in ((["theta_E"], True), (["log10_axion_mass"], True), (["theta_E", "e1"], False)):
        run = run_config(study, source, "scratch", 60, tmp_path, str(separable_data), 0, "multitask",
                         ["regression"], ["theta_E"])
        run = head_options(run, cfg.options("regression"), names)
        head = run.model.task_options["regression"]
        assert (head.loss, head.tta, run.data.augment) == ("huber", tta, tta)   # flips change e1: none for it


# ---- precise BatchNorm statistics after the last step -------------------------------------------------------------

def test_precise_bn_sets_each_batchnorm_to_the_exact_statistics_of_its_inputs_over_the_train_images(
        separable_data, tiny_args, tmp_path):
    from dlscale.data.stream import StreamConfig, eval_loader
    from dlscale.train.adabn import batchnorm_layers
    from dlscale.train.evaluation import load_run
    run = train(*BOTH_HEADS, "--data", separable_data, "--run-dir", tmp_path / "pbn", *tiny_args,
                "--schedule.epochs=1", "--schedule.batches_per_epoch=3", "--eval.precise_bn=-1",
                "--optim.lr=0.05")
    assert json.loads((run / "metrics.json").read_text())["precise_bn/images"] == 240
    cfg, model, _ = load_run(run)
    model.eval()
    stream = StreamConfig(batch_size=50, num_workers=0, normalize=cfg.data.normalize, augment=False)
    images = torch.cat([b["image"] for b in eval_loader(separable_data, stream, split="train")])
    assert len(images) == 240
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0]))
             for name, layer in batchnorm_layers(model).items()]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    encoder = {name: layer for name, layer in batchnorm_layers(model).items() if name.startswith("encoder.")}
    assert len(encoder) == 3   # the small CNN's (the classifier's standardisation is refitted after, on the probe's)
    for name, layer in encoder.items():
        x = inputs[name].double().transpose(0, 1).flatten(1)
        assert torch.allclose(layer.running_mean.double(), x.mean(1), rtol=1e-4, atol=1e-5), name
        assert torch.allclose(layer.running_var.double(), x.var(1), rtol=1e-4, atol=1e-5), name


def test_precise_bn_below_minus_one_is_refused_naming_the_key(separable_data):
    from dlscale.train.config import load_config
    with pytest.raises(ValueError, match=r"eval\.precise_bn=-2"):
        load_config(None, ["eval.precise_bn=-2"], stage="supervised", data_dir=str(separable_data))


# ---- the head refitted after the last step ------------------------------------------------------------------------

# after tiny_args, whose eval.probe_samples=96 it overrides: the refit then reads the whole train split
REFIT_RUN = ["--stage", "multitask", "--model.tasks=[regression]", "--data.targets=[theta_E]", "--eval.probe_samples=0",
             "--schedule.epochs=1", "--schedule.batches_per_epoch=4", "--model.task_options.regression.tta=true"]


def check_the_refit_moved_only_the_intercept_by_the_median_residual(data: Path, plain_run: Path,
                                                                    refitted_run: Path) -> None:
    """`plain_run` and `refitted_run`: the same deterministic run without and with the refit. The encoder and the
    head's weights are bitwise equal (240 images, 33 coefficients: too few for every weight, so only the intercept
    moves), and the intercept moved by the median residual of the trained head on the train images' features
    averaged over the 8 views, computed here by hand."""
    from dlscale.data.stream import StreamConfig, eval_loader
    from dlscale.models.heads import global_pool
    from dlscale.train.evaluation import load_run
    metrics = {run: json.loads((run / "metrics.json").read_text()) for run in (plain_run, refitted_run)}
    assert metrics[refitted_run]["refit/regression/samples"] == 240
    assert metrics[refitted_run]["refit/regression/parameters"] == 1
    assert not any(k.startswith("refit/") for k in metrics[plain_run])
    (cfg, plain, info), (_, refitted, _) = load_run(plain_run), load_run(refitted_run)
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, refitted.state_dict()[k])]
    assert changed == ["heads.regression.linear.bias"]
    stream = StreamConfig(batch_size=50, num_workers=0, normalize=cfg.data.normalize, augment=False,
                          targets=["theta_E"])
    batches = list(eval_loader(data, stream, split="train"))
    images, targets = torch.cat([b["image"] for b in batches]), torch.cat([b["target"] for b in batches])[:, 0]
    plain.eval()
    with torch.no_grad():
        features = torch.stack([global_pool(plain.encoder(v)) for v in _symmetries(images)]).mean(0).double()
    head = plain.heads["regression"].linear.requires_grad_(False)
    mean, std = info["target_stats"]["mean"][0], info["target_stats"]["std"][0]
    residual = (targets.double() - mean) / std - (features @ head.weight[0].double() + head.bias[0].double())
    moved = refitted.heads["regression"].linear.bias[0].detach().double() - head.bias[0].double()
    assert np.isclose(float(moved), np.median(residual.numpy()), rtol=1e-4, atol=1e-5)
    with np.load(refitted_run / "scores_val.npz") as npz:
        assert "tta_features" not in npz.files and "regression" in npz.files


def test_the_regression_head_is_refitted_to_the_view_averaged_features_of_the_whole_train_split(
        separable_data, tiny_args, tmp_path):
    """With 0 workers, and the refitted run again with 2: bitwise the same model."""
    runs = {(refit, workers): train("--data", separable_data, "--run-dir", tmp_path / f"refit_{refit}_w{workers}",
                                    *tiny_args, *REFIT_RUN, f"--model.task_options.regression.refit_head={refit}",
                                    f"--data.num_workers={workers}")
            for refit, workers in (("false", 0), ("true", 0), ("true", 2))}
    check_the_refit_moved_only_the_intercept_by_the_median_residual(separable_data, runs["false", 0],
                                                                    runs["true", 0])
    models = [torch.load(runs["true", w] / "model.pt", weights_only=True) for w in (0, 2)]
    assert all(torch.equal(v, models[1][k]) for k, v in models[0].items() if torch.is_tensor(v))


@pytest.mark.slow   # two 2-rank runs under torchrun
def test_the_regression_refit_on_2_ranks_with_workers_and_another_hash_seed_uses_the_whole_train_split(
        separable_data, tiny_args, venv_bin, free_ports, tmp_path):
    """Each rank reads half of the train split; the refit sees all of it, the same on both ranks (the exported head
    is rank 0's), with 2 DataLoader workers and PYTHONHASHSEED=7."""
    runs = {}
    for refit in ("false", "true"):
        runs[refit] = tmp_path / f"refit_{refit}"
        argv = [venv_bin / "torchrun", "--nnodes=1", "--nproc_per_node=2", f"--master_port={free_ports(1)[0]}",
                "--master_addr=127.0.0.1", "-m", "dlscale.cli", "train", "--data", separable_data, "--run-dir",
                runs[refit], *tiny_args, *REFIT_RUN, "--data.num_workers=2",
                f"--model.task_options.regression.refit_head={refit}"]
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**_base_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                   "PYTHONHASHSEED": "7"})
        assert done.returncode == 0, done.stderr[-3000:]
    check_the_refit_moved_only_the_intercept_by_the_median_residual(separable_data, runs["false"], runs["true"])
