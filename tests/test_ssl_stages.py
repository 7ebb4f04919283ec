"""The mae and contrastive stages through the real engine (one process): they train, evaluate (linear probe on the
clean features) and export; BYOL resumes to the same parameters, target network and draw count included."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dlscale
from dlscale.cli import main
from dlscale.models import EncoderConfig
from dlscale.train.model import build_model
from runs import own_logging

SHORT = ["--schedule.epochs=1", "--schedule.batches_per_epoch=3"]




def train(stage: str, data: Path, run_dir: Path, *extra: str) -> dict:
    with own_logging():
        assert main(["train", "--stage", stage, "--data", str(data), "--run-dir", str(run_dir), *extra]) == 0
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ssl_runs")


@pytest.mark.parametrize(("stage", "extra"), [
    ("mae", []),
    ("mae", ["--model.encoder.name=vit_tiny", "--model.task_options.mae.decoder_dim=32",
             "--model.task_options.mae.decoder_depth=1"]),
    ("contrastive", []),
    ("contrastive", ["--model.task_options.contrastive.method=byol"]),
], ids=["mae-cnn", "mae-vit", "simclr", "byol"])
def test_ssl_stage_trains_evaluates_and_exports(runs, separable_data, tiny_args, stage, extra):
    run_dir = runs / f"{stage}-{len(extra)}"
    metrics = train(stage, separable_data, run_dir, *tiny_args, *SHORT, *extra)
    assert 0.0 <= metrics["probe/accuracy"] <= 1.0
    log = (run_dir / "log.txt").read_text()
    assert f"stage {stage}, tasks {stage}" in log
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state[f"heads.{stage}._extra_state"] == {"draws": 3}
    encoder = dlscale.load_encoder(run_dir / "encoder.pt")          # the exported encoder rebuilds (ViT too)
    with torch.no_grad():
        feature_map = encoder(torch.rand(2, 1, 32, 32))
    assert feature_map.shape == (2, encoder.out_channels, 32 // encoder.downsample, 32 // encoder.downsample)
    assert torch.equal(encoder.state_dict()[next(iter(encoder.state_dict()))],
                       state[f"encoder.{next(iter(encoder.state_dict()))}"])
    if stage == "mae":
        scores = dict(np.load(run_dir / "scores_val.npz"))
        assert len(scores["mae_masked_mse"]) == 61 and (scores["mae_masked_mse"] > 0).all()


def test_byol_resumes_to_the_same_parameters_target_network_included(runs, separable_data, tiny_args):
    args = [*tiny_args, "--model.task_options.contrastive.method=byol", "--schedule.epochs=2",
            "--schedule.batches_per_epoch=4", "--schedule.checkpoint_every=2", "--schedule.keep_checkpoints=10",
            "--model.task_options.contrastive.tau_schedule_steps=8"]
    whole = runs / "byol-whole"
    train("contrastive", separable_data, whole, *args)
    resumed = runs / "byol-resumed"
    shutil.copytree(whole, resumed)
    for name in ("model.pt", "encoder.pt", "metrics.json"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / "checkpoints" / "step00000008")           # as if killed after step 6 (epoch 2, batch 2)
    (resumed / "checkpoints" / "latest").write_text("step00000006")
    train("contrastive", separable_data, resumed, *args, "--resume", "auto")
    assert "resumed from step00000006 (epoch 1, batch 2" in (resumed / "log.txt").read_text()
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and a["heads.contrastive._extra_state"] == {"draws": 8}
    assert b["heads.contrastive._extra_state"] == {"draws": 8}
    different = [k for k, v in a.items() if torch.is_tensor(v) and not torch.equal(v, b[k])]
    assert not different
    targets = [k for k in a if k.startswith("heads.contrastive.target_encoder.") and k.endswith("weight")]
    online = [k.replace("heads.contrastive.target_encoder.", "encoder.") for k in targets]
    assert targets and any(not torch.equal(a[t], a[o]) for t, o in zip(targets, online))   # a real EMA lag


def test_draw_count_restores_the_same_masks():
    def build():
        return build_model("mae", EncoderConfig(name="small", width=8), (1, 32, 32))
    model, images = build(), torch.rand(4, 1, 32, 32)
    model(images, batch={})
    state = model.state_dict()
    expected = model(images, batch={})["mae_mask"]
    again = build()
    again.load_state_dict(state)
    assert torch.equal(again(images, batch={})["mae_mask"], expected)
    assert not torch.equal(model(images, batch={})["mae_mask"], expected)     # the next draw differs
    assert torch.equal(model(images)["mae_mask"], model(images)["mae_mask"])  # evaluation masks are fixed
