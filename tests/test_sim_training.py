"""Training straight from the simulator (`data.source=simulate`): a run trains and evaluates on a fixed simulated
set cached in its run directory; a killed 2-rank run resumes to the parameters of an uninterrupted one; a bad
simulator setting fails before anything is created, naming the key."""
import json
import re
from pathlib import Path

import pytest
import torch

from dlscale import preemption

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TIMEOUT_S = 300
BATCHES = 6
SIM = ["--data.source=simulate", "--data.simulator.overrides={instrument.n_pix: 32, lens.randomize: true}",
       "--data.simulator.eval_per_class=16", "--data.simulator.probe_per_class=16", "--model.encoder.name=small",
       "--model.encoder.width=8", "--data.batch_size=12", "--data.num_workers=0", "--eval.n_bootstrap=10",
       "--schedule.log_every=2", f"--schedule.batches_per_epoch={BATCHES}", "--schedule.epochs=3",
       "--schedule.checkpoint_every=2", "--data.targets=[theta_E]"]


def two_ranks(venv_bin, run_dir: Path, *extra) -> list:
    return [venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT, "--stage", "multitask",
            "--run-dir", run_dir, *SIM, *extra]


# The killed run's crash: rank 0 SIGKILLs itself right after step 15 of 18 (the preemption drill); the checkpoint of
# step 14 (mid-epoch, last epoch) is its newest complete one.
KILL_AT_STEP = 2 * BATCHES + 3


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory, launch, venv_bin):
    """An uninterrupted 2-rank run and one SIGKILLed in its last epoch, started together."""
    root = tmp_path_factory.mktemp("sim")
    whole = launch(two_ranks(venv_bin, root / "whole"), root / "whole.log", root)
    killed = launch(two_ranks(venv_bin, root / "killed"), root / "killed.log", root,
                    env={preemption.DRILL: f"{KILL_AT_STEP}:SIGKILL"})
    assert killed.wait(TIMEOUT_S) != 0, killed.output()[-4000:]
    assert whole.wait(TIMEOUT_S) == 0, whole.output()[-4000:]
    return root, killed


def test_a_run_trains_from_the_simulator_and_records_how_to_regenerate_its_data(sim_runs):
    root, _ = sim_runs
    run = root / "whole"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 3 * BATCHES and metrics["val/n_samples"] == 48 and "val/mae/theta_E" in metrics
    simulation = json.loads((run / "simulation.json").read_text())
    assert simulation["simulator"]["instrument"]["n_pix"] == 32 and simulation["seed"] == 0
    assert simulation["batches_per_epoch"] == BATCHES and simulation["world"] == 2
    config = (run / "config.yaml").read_text()
    assert f"data_dir: {run / 'eval_data'}" in config
    manifest = json.loads((run / "eval_data" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["samples"] == 48 and manifest["source"]["seed"] != 0


def test_killed_simulation_run_resumes_to_the_same_parameters(sim_runs, launch, venv_bin):
    root, killed = sim_runs
    run = root / "killed"
    assert re.search(rf"drill: rank 0 sends SIGKILL to itself \(pid \d+\) after step {KILL_AT_STEP}\n",
                     (run / "log.txt").read_text()), killed.output()[-3000:]
    assert "SIGKILL" in killed.output() and not (run / "model.pt").exists()
    assert int((run / "checkpoints" / "latest").read_text().strip()[4:]) == KILL_AT_STEP - 1
    eval_manifest = (run / "eval_data" / "manifest.json").read_bytes()
    resumed = launch(two_ranks(venv_bin, run, "--resume", "auto"), root / "resumed.log", root)
    assert resumed.wait(TIMEOUT_S) == 0, resumed.output()[-4000:]
    assert "resumed from step" in (run / "log.txt").read_text()
    assert "reusing the evaluation set" in resumed.output()
    assert (run / "eval_data" / "manifest.json").read_bytes() == eval_manifest
    got = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(root / "whole" / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    assert [k for k, v in got.items() if torch.is_tensor(v) and not torch.equal(v, want[k])] == []
    assert json.loads((run / "metrics.json").read_text())["val/auc_macro"] == pytest.approx(
        json.loads((root / "whole" / "metrics.json").read_text())["val/auc_macro"])


@pytest.mark.parametrize(("override", "message"), [
    ("--data.simulator.overrides={source.magnitude: -80}", "source.magnitude"),
    ("--data.simulator.preset=model_x", "data.simulator.preset"),
    ("--data.targets=[axion_mass]", "axion_mass"),
])
def test_bad_simulator_settings_fail_before_the_run_directory_exists(cli, tmp_path, override, message):
    result = cli("train", "--stage", "supervised", "--run-dir", tmp_path / "run", *SIM, override)
    assert result.code != 0 and message in result.err
    assert not (tmp_path / "run").exists()


def test_simulation_source_needs_a_number_of_batches_per_epoch(cli, tmp_path):
    result = cli("train", "--stage", "supervised", "--run-dir", tmp_path / "run", "--data.source=simulate")
    assert result.code != 0 and "schedule.batches_per_epoch" in result.err
