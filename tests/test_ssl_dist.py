"""The self-supervised stages on 2 real ranks (torchrun, gloo): mae (small CNN and ViT-Tiny), contrastive (SimCLR
with negatives from both ranks, BYOL) and multitask mae + classification under FAMO. All launches start together
and run in parallel (process start-up, not training, is the cost); the tests check their run directories: trained
on 2 ranks, every val sample scored once, the exported encoder loads and holds the trained weights, the linear
probe is in metrics.json.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dlscale

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TIMEOUT_S = 300
BATCHES = 3          # per rank
VIT = ["--model.encoder.name=vit_tiny", "--model.task_options.mae.decoder_dim=32",
       "--model.task_options.mae.decoder_depth=1"]
RUNS = {
    "mae-cnn": ("mae", []),
    "mae-vit": ("mae", VIT),
    "simclr": ("contrastive", []),
    "byol": ("contrastive", ["--model.task_options.contrastive.method=byol"]),
    "multitask-famo": ("multitask", ["--model.tasks=[mae,classification]", "--loss.method=famo"]),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory, launch, venv_bin, free_ports, separable_data, tiny_args):
    """Start every run, wait for all; {name: (run dir, exit code, output)}."""
    root = tmp_path_factory.mktemp("ssl_dist")
    started = {}
    for (name, (stage, extra)), port in zip(RUNS.items(), free_ports(len(RUNS))):
        argv = [venv_bin / "torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", port, TRAIN_SCRIPT, "--stage", stage, "--data", separable_data,
                "--run-dir", root / name, *tiny_args, "--schedule.epochs=1", f"--schedule.batches_per_epoch={BATCHES}",
                *extra]
        started[name] = launch(argv, root / f"{name}.log", root)
    return {name: (root / name, process.wait(TIMEOUT_S), process.output()) for name, process in started.items()}


def finished(launched, name: str) -> tuple[Path, dict, dict]:
    """(run dir, metrics, model.pt state) of a run that trained on 2 ranks and evaluated every val sample once."""
    run_dir, code, output = launched[name]
    assert code == 0, output[-4000:]
    assert "2 rank(s)" in (run_dir / "log.txt").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == BATCHES
    assert metrics["val/n_samples"] == 61
    ids = [tuple(i) for i in np.load(run_dir / "scores_val.npz")["ids"].tolist()]
    assert len(ids) == len(set(ids)) == 61
    assert 0.0 <= metrics["probe/accuracy"] <= 1.0 and 0.5 < metrics["probe/auc_macro"] <= 1.0
    return run_dir, metrics, torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def exported_encoder_is_the_trained_one(run_dir: Path, state: dict, name: str) -> None:
    encoder = dlscale.load_encoder(run_dir / "encoder.pt")
    assert encoder.dlscale["encoder_config"]["name"] == name
    trained = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    assert encoder.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in encoder.state_dict().items())
    with torch.no_grad():
        feature_map = encoder(torch.rand(2, 1, 32, 32))
    side = 32 // encoder.downsample
    assert feature_map.shape == (2, encoder.out_channels, side, side) and torch.isfinite(feature_map).all()


@pytest.mark.parametrize(("run", "encoder"), [("mae-cnn", "small"), ("mae-vit", "vit_tiny")])
def test_mae_trains_on_two_ranks_and_exports_its_encoder(launched, run, encoder):
    run_dir, metrics, state = finished(launched, run)
    assert state["heads.mae._extra_state"] == {"draws": BATCHES}      # one mask draw per training forward
    scores = np.load(run_dir / "scores_val.npz")["mae_masked_mse"]
    assert len(scores) == 61 and (scores > 0).all()
    assert metrics["val/mae_masked_mse"] == pytest.approx(float(scores.mean()), rel=1e-6)
    exported_encoder_is_the_trained_one(run_dir, state, encoder)


@pytest.mark.parametrize("run", ["simclr", "byol"])
def test_contrastive_trains_on_two_ranks_and_exports_its_encoder(launched, run):
    run_dir, metrics, state = finished(launched, run)
    assert state["heads.contrastive._extra_state"] == {"draws": BATCHES}
    assert np.isfinite(metrics["probe/auc_macro"])
    target = {k: v for k, v in state.items() if k.startswith("heads.contrastive.target_")}
    if run == "byol":
        # the target network follows the online one by EMA: close to it, and lagging behind
        pairs = [(v, state[k.replace("heads.contrastive.target_encoder.", "encoder.")]) for k, v in target.items()
                 if k.startswith("heads.contrastive.target_encoder.") and v.is_floating_point()]
        assert pairs and any(not torch.equal(t, o) for t, o in pairs)
    else:
        assert not target and any(k.startswith("heads.contrastive.projector.") for k in state)
    exported_encoder_is_the_trained_one(run_dir, state, "small")


def test_multitask_mae_and_classification_train_on_two_ranks_under_famo(launched):
    run_dir, metrics, state = finished(launched, "multitask-famo")
    assert "tasks classification+mae" in (run_dir / "log.txt").read_text()     # registry order
    assert {"val/auc_macro", "val/accuracy", "val/mae_masked_mse"} <= set(metrics)
    weights = [metrics["train/weight_mae"], metrics["train/weight_classification"]]
    assert sum(weights) == pytest.approx(1.0, rel=1e-5) and min(weights) > 0     # FAMO's weights sum to one
    assert any(k.startswith("heads.classification.") for k in state) and "heads.mae._extra_state" in state
    exported_encoder_is_the_trained_one(run_dir, state, "small")
