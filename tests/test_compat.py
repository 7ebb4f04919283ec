"""Run directories written by dlscale 0.1 still load: `tests/fixtures/v01_multitask` is a multitask run (small
encoder, DWA, theta_E regression) trained by dlscale 0.1 on the simulated set that `SIMULATE` makes. Evaluated by
today's code on that set, it reproduces the metrics 0.1 recorded (but the linear probe's: its train set is now
stratified); its encoder loads and starts a new run."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import dlscale

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v01_multitask"
SIMULATE = ["--preset", "model_ii", "--n-per-class", "20", "--splits", "train=0.6,val=0.4",
            "--samples-per-record", "8", "--shard-size", "32"]


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    from dlscale.cli import main
    root = tmp_path_factory.mktemp("v01")
    assert main(["simulate", *SIMULATE, "--out", str(root / "data")]) == 0
    return shutil.copytree(FIXTURE, root / "run"), root / "data"


def test_a_dlscale_0_1_run_evaluates_to_the_metrics_it_recorded(old_run, cli):
    run, data = old_run
    before = (run / "metrics.json").read_bytes()
    result = cli("eval", "--run-dir", run, "--data", data)
    assert result.code == 0, result.err[-3000:]
    assert (run / "metrics.json").read_bytes() == before
    recorded = json.loads(before)
    now = json.loads((run / "eval" / "data-val" / "metrics.json").read_text())
    # not probe/accuracy: the probe's train set is now the first probe_samples / 3 of each class, not 0.1's first
    # probe_samples in id order
    keys = ["val/accuracy", "val/auc_macro", "val/recon_mse", "val/mae/theta_E"]
    assert {k: now[k] for k in keys} == pytest.approx({k: recorded[k] for k in keys}, abs=1e-5)
    assert "macro AUC" in result.out and str(run / "eval" / "data-val") in result.out


def test_a_dlscale_0_1_encoder_loads_and_starts_a_new_run(old_run, cli, tmp_path):
    run, data = old_run
    encoder = dlscale.load_encoder(run)
    assert encoder.dlscale["stage"] == "multitask" and encoder(torch.rand(2, 1, 64, 64)).shape == (2, 16, 8, 8)
    result = cli("train", "--stage", "supervised", "--data", data, "--run-dir", tmp_path / "new", "--init-from", run,
                 "--model.encoder.name=small", "--model.encoder.width=4", "--data.batch_size=8",
                 "--data.num_workers=0", "--schedule.epochs=1", "--eval.n_bootstrap=10", "--optim.lr=0")
    assert result.code == 0, result.err[-3000:]
    started = torch.load(run / "encoder.pt", weights_only=True)["state_dict"]
    ended = torch.load(tmp_path / "new" / "encoder.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(started[k], ended[k]) for k in started if "running" not in k and "num_batches" not in k)


def test_a_dlscale_0_1_config_is_translated_by_its_format_version(tmp_path):
    """The fixture's config.yaml has no format_version: dlscale.compat reads it as 0.1's (its keys moved, 0.1's
    heads selected); the same keys in a file of today's version are refused, naming the key."""
    from dlscale.compat import FORMAT_VERSION
    from dlscale.configtree import dump_yaml
    from dlscale.train.config import load_config
    cfg = load_config(FIXTURE / "config.yaml")
    assert cfg.format_version == FORMAT_VERSION and cfg.loss.dwa.temperature == 2.0
    assert cfg.model.task_options["recon"].decoder == "wide"
    assert cfg.model.task_options["classification"].standardize is False
    (tmp_path / "now.yaml").write_text(dump_yaml(cfg))            # written now: loads back unchanged
    assert load_config(tmp_path / "now.yaml") == cfg
    text = (FIXTURE / "config.yaml").read_text()
    (tmp_path / "versioned.yaml").write_text(f"format_version: {FORMAT_VERSION}\n{text}")
    with pytest.raises(ValueError, match=r"'model\.encoder\.weights_path'"):
        load_config(tmp_path / "versioned.yaml")
    (tmp_path / "newer.yaml").write_text(f"format_version: {FORMAT_VERSION + 1}\n{text}")
    with pytest.raises(ValueError, match="newer than this dlscale reads"):
        load_config(tmp_path / "newer.yaml")


def test_model_pt_keys_are_translated_by_the_run_s_format_version():
    """model.pt stays a plain state dict; its run's config.yaml version decides: 0.1's head names are renamed for a
    run without a version, and left alone (a missing key then fails loudly) for one of today's."""
    import torch
    from dlscale.compat import FORMAT_0_1, FORMAT_VERSION, upgrade_model_state
    state = torch.load(FIXTURE / "model.pt", map_location="cpu", weights_only=True)
    legacy = sorted(k for k in state if k.startswith(("decoder.", "classifier.", "regressor.")))
    assert legacy, "the 0.1 fixture keeps 0.1's head names"
    upgraded = upgrade_model_state(dict(state), FORMAT_0_1)
    assert not any(k.startswith(("decoder.", "classifier.", "regressor.")) for k in upgraded)
    assert {k for k in upgraded if k.startswith("heads.")} and len(upgraded) == len(state)
    assert upgrade_model_state(dict(state), FORMAT_VERSION).keys() == state.keys()
