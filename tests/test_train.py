"""Training stages in one process: each stage trains, the outputs are right (metrics against scikit-learn,
TensorBoard, exported encoder, `dlscale eval`), a killed run resumes to the same parameters, bad input fails clearly.

Runs go through `dlscale.cli.main` in the test process (its world-of-one process group is created once and reused);
only the run that is killed needs a process of its own. Multi-process launches are in test_train_dist.py.
"""
import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score, roc_auc_score

import dlscale
from dlscale import preemption
from dlscale.cli import main
from dlscale.data.classes import CLASSES
from dlscale.train.trainer import NonFiniteLossError
from runs import own_logging

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
# 3 epochs x 15 batches; DWA weights and the regression target make the checkpointed state more than the weights
MULTITASK = ["--loss.method=dwa", "--data.targets=[theta_E]", "--schedule.epochs=3", "--optim.lr=3e-3",
             "--optim.warmup_steps=5", "--schedule.checkpoint_every=4"]
BATCHES = 240 // 16
TIMEOUT_S = 180
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")




def train(stage: str, data: Path, run_dir: Path, *extra: str) -> dict:
    """Train in this process; return metrics.json."""
    with own_logging():
        assert main(["train", "--stage", stage, "--data", str(data), "--run-dir", str(run_dir), *extra]) == 0
    return json.loads((run_dir / "metrics.json").read_text())


def latest_tag(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def autoencoder_run(runs, separable_data, tiny_args) -> Path:
    train("autoencoder", separable_data, runs / "autoencoder", *tiny_args, "--schedule.epochs=1")
    return runs / "autoencoder"


@pytest.fixture(scope="module")
def supervised_run(runs, separable_data, tiny_args) -> Path:
    """3 steps only and the head as trained (refitted to these separable features it would be perfect): the scores
    are not yet perfect (perfect scores would match many a wrong metric formula)."""
    train("supervised", separable_data, runs / "supervised", *tiny_args, "--schedule.epochs=1",
          "--schedule.batches_per_epoch=3", "--model.task_options.classification.refit_head=false")
    return runs / "supervised"


@pytest.fixture(scope="module")
def multitask_run(runs, separable_data, tiny_args) -> Path:
    train("multitask", separable_data, runs / "multitask", *tiny_args, *MULTITASK)
    return runs / "multitask"


def test_autoencoder_trains_in_one_process(autoencoder_run):
    metrics = json.loads((autoencoder_run / "metrics.json").read_text())
    assert metrics["step"] == BATCHES
    assert 0 < metrics["val/recon_mse"] < 1 and "val/accuracy" not in metrics
    assert latest_tag(autoencoder_run) == f"step{BATCHES:08d}"
    assert (autoencoder_run / "encoder.pt").is_file() and (autoencoder_run / "model.pt").is_file()


def test_supervised_trains_in_one_process(supervised_run):
    metrics = json.loads((supervised_run / "metrics.json").read_text())
    assert metrics["step"] == 3
    assert metrics["val/n_samples"] == 61 and "val/recon_mse" not in metrics
    assert latest_tag(supervised_run) == "step00000003"
    assert (supervised_run / "roc.png").stat().st_size > 0


def test_multitask_trains_in_one_process(multitask_run):
    metrics = json.loads((multitask_run / "metrics.json").read_text())
    assert metrics["step"] == 3 * BATCHES
    assert {"val/accuracy", "val/recon_mse", "val/mae/theta_E", "probe/auc_macro"} <= set(metrics)
    assert latest_tag(multitask_run) == f"step{3 * BATCHES:08d}"


def test_separable_toy_set_is_learned_to_macro_auc_above_0_97(multitask_run):
    metrics = json.loads((multitask_run / "metrics.json").read_text())
    assert metrics["val/auc_macro"] > 0.97
    assert metrics["val/accuracy"] > 0.9


def test_metrics_json_equal_scikit_learn_on_the_saved_scores(supervised_run, records, separable_data):
    metrics = json.loads((supervised_run / "metrics.json").read_text())
    scores = np.load(supervised_run / "scores_val.npz")
    probs, labels = scores["probs"], scores["labels"]
    truth = {s.id: s.label for s in records(separable_data, "val")}
    assert [truth[tuple(i)] for i in scores["ids"].tolist()] == labels.tolist()
    assert metrics["val/accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)), abs=1e-12)
    assert metrics["val/auc_macro"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-12)
    for k, name in enumerate(CLASSES):
        assert metrics[f"val/auc/{name}"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]), abs=1e-12)
    onehot = np.eye(len(CLASSES))[labels]
    assert metrics["val/auc_micro"] == pytest.approx(roc_auc_score(onehot, probs, average="micro"), abs=1e-12)
    assert 0 < metrics["val/auc_macro"] < 1 and metrics["val/accuracy"] < 1


def test_tensorboard_holds_the_named_scalars_and_the_roc_figure(multitask_run):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
    events = EventAccumulator(str(multitask_run / "tb"), size_guidance={IMAGES: 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/loss_recon", "train/loss_classification", "train/loss_regression",
                "val/accuracy", "val/auc_macro", "val/recon_mse", "throughput/samples_per_s",
                *(f"val/auc/{name}" for name in CLASSES)}
    assert expected <= scalars, f"missing {sorted(expected - scalars)}"
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 3 * BATCHES + 1, 5))
    metrics = json.loads((multitask_run / "metrics.json").read_text())
    assert events.Scalars("val/auc_macro")[-1].value == pytest.approx(metrics["val/auc_macro"])
    roc = events.Images("val/roc")
    assert len(roc) == 1 and roc[0].step == 3 * BATCHES and roc[0].encoded_image_string[:4] == b"\x89PNG"


# The killed run's crash: SIGKILL right after step 34 of 45 (the preemption drill), the checkpoint of step 32 being
# its newest complete one: mid-epoch in the last epoch, with two epochs of DWA history behind it.
KILL_AT_STEP = 2 * BATCHES + 4


@pytest.fixture(scope="module")
def killed_run(runs, separable_data, tiny_args, launch):
    """The resume test's run, in a process of its own (a multi-process test, hence `slow`); it SIGKILLs itself after
    step `KILL_AT_STEP`. Returns (launch, run dir)."""
    run_dir = runs / "killed"
    killed = launch([sys.executable, TRAIN_SCRIPT, "--stage", "multitask", "--data", separable_data, "--run-dir",
                     run_dir, *tiny_args, *MULTITASK], runs / "killed.log", runs,
                    env={preemption.DRILL: f"{KILL_AT_STEP}:SIGKILL"})
    return killed, run_dir


def test_killed_run_resumes_to_the_same_parameters_as_an_uninterrupted_one(killed_run, multitask_run,
                                                                           separable_data, tiny_args):
    killed, run_dir = killed_run
    code = killed.wait(TIMEOUT_S)
    assert code == -9, f"not killed mid-run; output ends:\n{killed.output()[-3000:]}"
    assert re.search(rf"drill: rank 0 sends SIGKILL to itself \(pid \d+\) after step {KILL_AT_STEP}\n",
                     (run_dir / "log.txt").read_text()), killed.output()[-3000:]
    assert not (run_dir / "model.pt").exists()
    tag = latest_tag(run_dir)
    assert int(tag[4:]) == KILL_AT_STEP - KILL_AT_STEP % 4   # the newest checkpoint before the kill
    assert 2 * BATCHES < int(tag[4:]) < 3 * BATCHES and int(tag[4:]) % BATCHES

    train("multitask", separable_data, run_dir, *tiny_args, *MULTITASK, "--resume", "auto")
    assert f"resumed from {tag} (epoch 2, batch {int(tag[4:]) - 2 * BATCHES}" in (run_dir / "log.txt").read_text()
    resumed = torch.load(run_dir / "model.pt", weights_only=True)
    uninterrupted = torch.load(multitask_run / "model.pt", weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    assert resumed["weighting._extra_state"] == uninterrupted["weighting._extra_state"]   # the DWA loss history
    different = [k for k, v in resumed.items() if torch.is_tensor(v) and not torch.equal(v, uninterrupted[k])]
    assert not different


def test_load_encoder_returns_the_trained_encoder(supervised_run):
    encoder = dlscale.load_encoder(supervised_run / "encoder.pt")
    assert isinstance(encoder, torch.nn.Module) and not encoder.training
    model = torch.load(supervised_run / "model.pt", weights_only=True)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, model[f"encoder.{key}"]), key
    with torch.no_grad():
        features = encoder(torch.rand(5, 1, 32, 32))
    assert features.shape == (5, 32, 4, 4) and torch.isfinite(features).all()
    assert encoder.dlscale["classes"] == list(CLASSES) and encoder.dlscale["image_shape"] == [1, 32, 32]


def test_eval_command_reproduces_the_run_metrics(supervised_run, tmp_path, cli):
    import shutil
    run_dir = shutil.copytree(supervised_run, tmp_path / "run")
    trained = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").unlink()
    result = cli("eval", "--run-dir", run_dir, "--split", "val")
    assert result.code == 0, result.err
    evaluated = json.loads((run_dir / "metrics.json").read_text())
    keys = [k for k in trained if k.startswith(("val/", "probe/")) and not isinstance(trained[k], list)]
    assert {k: evaluated[k] for k in keys} == pytest.approx({k: trained[k] for k in keys}, abs=1e-6)
    assert evaluated["val/confusion_matrix"] == trained["val/confusion_matrix"]


def test_multitask_init_from_an_autoencoder_run_starts_from_its_encoder(autoencoder_run, separable_data, tiny_args,
                                                                        runs):
    # lr=0: AdamW changes nothing (its weight decay is scaled by lr too), so the encoder ends as it started
    train("multitask", separable_data, runs / "from_ae", *tiny_args, "--schedule.epochs=1", "--optim.lr=0",
          "--init-from", str(autoencoder_run))
    started = torch.load(autoencoder_run / "encoder.pt", weights_only=True)["state_dict"]
    ended = torch.load(runs / "from_ae" / "encoder.pt", weights_only=True)["state_dict"]
    weights = [k for k in started if not k.endswith(BN_STATISTICS)]
    assert weights and all(torch.equal(started[k], ended[k]) for k in weights)
    assert f"encoder initialised from {autoencoder_run}" in (runs / "from_ae" / "log.txt").read_text()


def test_a_run_leaves_the_config_it_was_given_as_it_was(separable_data, tiny_args, runs):
    """Runs in one process (transfer studies, the quickstart, sweeps) record and compare the configs they pass: the
    run resolves `deepspeed.precision=auto` (and the other engine settings) in its own copy, which config.yaml
    records."""
    from dlscale.configtree import to_dict
    from dlscale.train.config import load_config
    from dlscale.train.runner import run
    cfg = load_config(None, [*tiny_args, "--schedule.epochs=1", "--schedule.batches_per_epoch=2"], stage="supervised",
                      data_dir=str(separable_data), run_dir=str(runs / "given"), device="cpu")
    given = copy.deepcopy(to_dict(cfg))
    assert cfg.deepspeed.precision == "auto"
    with own_logging():
        run(cfg)
    assert to_dict(cfg) == given
    assert yaml.safe_load((runs / "given" / "config.yaml").read_text())["deepspeed"]["precision"] == "fp32"


# ---- bad input: a clear error naming the problem ----------------------------------------------------------------

def test_data_dir_without_manifest_is_rejected(cli, tmp_path, tiny_args):
    (tmp_path / "empty").mkdir()
    result = cli("train", "--stage", "supervised", "--data", tmp_path / "empty", "--run-dir", tmp_path / "run",
                 *tiny_args)
    assert result.code != 0 and "manifest" in result.err and str(tmp_path / "empty") in result.err
    assert not (tmp_path / "run").exists()


def test_image_channels_other_than_the_encoder_input_are_rejected(cli, tmp_path, separable_data, tiny_args):
    result = cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", tmp_path / "run",
                 *tiny_args, "--model.encoder.in_channels=3")
    assert result.code != 0 and "1 channel(s)" in result.err and "--model.encoder.in_channels=1" in result.err


def test_unknown_stage_is_rejected(cli, capsys, tmp_path, separable_data, tiny_args):
    with pytest.raises(SystemExit) as exit_info:
        cli("train", "--stage", "pretrain", "--data", separable_data, "--run-dir", tmp_path / "run", *tiny_args)
    assert exit_info.value.code != 0
    assert "invalid choice: 'pretrain'" in capsys.readouterr().err


def test_unknown_config_key_is_rejected(cli, tmp_path, separable_data, tiny_args):
    result = cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", tmp_path / "run",
                 *tiny_args, "--optim.learning_rate=0.1")
    assert result.code != 0 and "unknown config key 'optim.learning_rate'" in result.err


def test_existing_run_dir_without_resume_is_rejected(cli, supervised_run, separable_data, tiny_args):
    before = (supervised_run / "metrics.json").read_text()
    result = cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", supervised_run, *tiny_args)
    assert result.code != 0 and f"run directory {supervised_run} exists" in result.err and "--resume" in result.err
    assert (supervised_run / "metrics.json").read_text() == before


def test_init_from_an_encoder_of_another_width_is_rejected(cli, tmp_path, autoencoder_run, separable_data,
                                                           tiny_args):
    result = cli("train", "--stage", "multitask", "--data", separable_data, "--run-dir", tmp_path / "run",
                 *tiny_args, "--model.encoder.width=16", "--init-from", autoencoder_run)
    assert result.code != 0 and "encoder width=8, this run has 16" in result.err


def test_init_from_an_encoder_trained_on_another_image_shape_is_rejected(cli, tmp_path, autoencoder_run,
                                                                         make_separable, tiny_args):
    small_images = make_separable(train=30, val=12, side=16)
    result = cli("train", "--stage", "multitask", "--data", small_images, "--run-dir", tmp_path / "run",
                 *tiny_args, "--init-from", autoencoder_run)
    assert result.code != 0 and "[1, 32, 32]" in result.err and "[1, 16, 16]" in result.err


@pytest.fixture(scope="module")
def overflow_failure(make_separable, records, runs):
    """An autoencoder run on raw values (normalize=none) over a set whose train sample 17 is ~1e30 everywhere:
    its squared reconstruction error overflows. A checkpoint after every step. Returns (run dir, error, key)."""
    data = make_separable(train=48, val=12, overflow=17)
    bad = next(s.id for s in records(data, "train") if s.meta["source_file"] == "train/17")
    run_dir = runs / "overflow"
    with pytest.raises(NonFiniteLossError) as error, own_logging():
        main(["train", "--stage", "autoencoder", "--data", str(data), "--run-dir", str(run_dir),
              "--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=4",
              "--data.num_workers=0", "--data.shuffle_buffer=8", "--data.normalize=none", "--schedule.epochs=4",
              "--schedule.checkpoint_every=1"])
    return run_dir, str(error.value), f"train-{bad[0]:06d}.tar:record {bad[1]}:sample {bad[2]}"


def test_non_finite_loss_stops_the_run_naming_the_step_and_the_batch_keys(overflow_failure):
    run_dir, message, bad_key = overflow_failure
    assert "non-finite loss at step " in message and bad_key in message
    assert not (run_dir / "model.pt").exists() and not (run_dir / "metrics.json").exists()


def test_non_finite_loss_leaves_the_last_good_checkpoint_as_latest(overflow_failure):
    run_dir, message, _ = overflow_failure
    step = int(message.split("non-finite loss at step ")[1].split()[0])
    assert step > 0, "the overflowing sample came first: no good checkpoint to keep (choose another sample)"
    assert latest_tag(run_dir) == f"step{step:08d}"
    assert max(p.name for p in (run_dir / "checkpoints").glob("step*")) == f"step{step:08d}"
    states = torch.load(run_dir / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert all(torch.isfinite(v).all() for v in states.values() if v.is_floating_point())
