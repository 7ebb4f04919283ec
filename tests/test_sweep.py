"""`dlscale tune`: Ray Tune sweeps of real multitask runs on 2 CPUs (tiny images, tiny encoder, few batches).

One ASHA sweep (through the library, with a trainable wrapper that makes one trial crash on its first attempt and
another on every attempt) is shared by the tests that read its results; the command line runs the interrupted and
resumed sweep, the 2-worker trial and the bad inputs. Every Ray started here is shut down, also on failure.
"""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import command_line, descendants
from dlscale.data.classes import CLASSES
from dlscale.sweep import Resources, load_sweep, outcomes, ray_cluster, run_sweep, trials_left, write_results

pytestmark = pytest.mark.slow   # Ray Tune sweeps: a Ray cluster and its workers

EPOCHS = 2
TINY_TRAIN = {
    "stage": "multitask",
    "model": {"encoder": {"name": "small", "width": 8}},
    "data": {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 64},
    "deepspeed": {"precision": "fp32"},
    "optim": {"warmup_steps": 1},
    "schedule": {"epochs": EPOCHS, "batches_per_epoch": 2, "eval_every_epochs": 1, "log_every": 100,
                 "keep_checkpoints": 1},
    "eval": {"n_bootstrap": 5, "probe_samples": 32},
}
GOOD_LR, BAD_LR = 1e-2, 1e-6     # the tiny model separates the classes within one epoch at GOOD_LR, not at BAD_LR
CRASH_ONCE, CRASH_ALWAYS = "00000", "00004"     # trial-id endings the wrapper below makes crash


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """1x32x32 images: a noisy background plus a centred bright disc whose radius encodes the class, so the
    classes stay separable under per-image minmax normalisation and the stream's flips and rotations."""
    from dlscale.data.shards import DatasetWriter
    out = tmp_path_factory.mktemp("sweep_data") / "data"
    rng = np.random.default_rng(0)
    radius = np.hypot(*(np.mgrid[:32, :32] - 15.5))
    with DatasetWriter(out, (1, 32, 32), {"kind": "test"}, shard_size=48, samples_per_record=16) as writer:
        for split, n in (("train", 96), ("val", 48)):
            for i in range(n):
                label = i % len(CLASSES)
                image = rng.random((1, 32, 32)) * 0.3 + (radius < 3 + 4 * label)
                writer.add(split, image.astype(np.float32), label, {"class": CLASSES[label],
                                                                    "source_file": f"{split}/{i}"})
    return out


def sweep_file(path: Path, space: dict, train: dict = TINY_TRAIN, **settings) -> Path:
    path.write_text(yaml.safe_dump({"sweep": settings, "space": space, "train": train}))
    return path


def ray_descendants() -> list[str]:
    """Command lines of Ray processes still running below this test process."""
    found = []
    for pid in descendants(os.getpid()):
        cmdline = command_line(pid)
        # Ray's own processes; not the eval-stream tests' multiprocessing fork server (its sys.path names ray/)
        if re.search(r"^ray::|/ray/|raylet|gcs_server", cmdline) and "multiprocessing.forkserver" not in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def asha_sweep(data, tmp_path_factory):
    """6 trials (3 samples x a good and a bad learning rate) under ASHA on 2 CPUs; trial CRASH_ONCE fails its first
    attempt, trial CRASH_ALWAYS every attempt (max_failures=1)."""
    root = tmp_path_factory.mktemp("asha")
    space = {"loss.method": {"choice": ["fixed", "uncertainty", "dwa"]}, "loss.weights.recon":
             {"loguniform": [0.01, 10]}, "optim.lr": {"grid": [GOOD_LR, BAD_LR]}}
    spec = load_sweep(sweep_file(root / "sweep.yaml", space, trials=3, grace_period=1, reduction_factor=2,
                                 max_failures=1), data_dir=str(data))
    out = root / "out"

    def crash_on_cue(params, job):   # pickled by value into the trial processes
        from ray import tune

        from dlscale.sweep import run_trial
        trial_id = tune.get_context().get_trial_id()
        marker = Path(job.out_dir) / f"crashed-{trial_id}"
        if trial_id.endswith(CRASH_ALWAYS) or trial_id.endswith(CRASH_ONCE) and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected crash of {trial_id}")
        run_trial(params, job)

    with ray_cluster() as cluster:
        results = run_sweep(spec, out, Resources(), cluster, trial=crash_on_cue)
    trials = outcomes(results, EPOCHS)
    summary = write_results(trials, spec, out)
    return {"out": out, "trials": {t.trial[-5:]: t for t in trials}, "summary": summary, "spec": spec,
            "trials_left": trials_left(spec, out), "leftover": ray_descendants()}


def test_asha_sweep_completes_and_stops_a_trial_early(asha_sweep):
    assert len(asha_sweep["trials"]) == 6 and asha_sweep["trials_left"] == 0
    stopped = [t for t in asha_sweep["trials"].values() if t.status == "stopped early"]
    assert stopped and all(t.epoch < EPOCHS and t.params["optim.lr"] == BAD_LR for t in stopped)
    assert all(t.value("val/auc_macro") > 0.95 for t in asha_sweep["trials"].values() if
               t.status == "completed" and t.params["optim.lr"] == GOOD_LR)


def test_crashing_trial_is_retried_from_scratch_and_completes(asha_sweep):
    trial = asha_sweep["trials"][CRASH_ONCE]
    assert trial.status == "completed" and trial.epoch == EPOCHS
    assert "injected crash" in (asha_sweep["out"] / trial.trial / "error.txt").read_text()


def test_trial_failing_every_attempt_is_reported(asha_sweep):
    trial = asha_sweep["trials"][CRASH_ALWAYS]
    assert trial.status == "failed" and "injected crash" in trial.error
    assert f"- {trial.trial}: " in asha_sweep["summary"] and "Failed trials (after 1 retries)" in asha_sweep["summary"]


def test_results_rank_trials_with_both_task_metrics_and_effective_weights(asha_sweep):
    out = asha_sweep["out"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    aucs = [float(r["val/auc_macro"]) for r in rows if r["val/auc_macro"]]
    assert aucs == sorted(aucs, reverse=True) and rows[-1]["status"] == "failed"
    for row in rows[:-1]:
        assert float(row["val/recon_mse"]) > 0 and float(row["weight classification"]) > 0
        if row["loss.method"] == "fixed":   # the sampled ratio is the weight; classification is the reference
            assert float(row["weight recon"]) == pytest.approx(float(row["loss.weights.recon"]), rel=1e-3)
            assert float(row["weight classification"]) == 1.0
        else:
            assert row["loss.weights.recon"] == "-"
    best = rows[0]["trial"]
    assert f"**Best: {best}**" in (out / "results.md").read_text()
    assert "Best trial of each weighting method" in asha_sweep["summary"]
    assert (out / "pareto.png").stat().st_size > 10_000


def test_best_config_trains_unchanged_with_dlscale_train(asha_sweep, cli):
    out = asha_sweep["out"]
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["run_dir"] == str(out / "best_run") and best["stage"] == "multitask"
    result = cli("train", "--config", out / "best_config.yaml")
    assert result.code == 0, result.err[-2000:]
    assert (out / "best_run" / "model.pt").is_file()


def test_every_trial_has_tensorboard_hparams_under_out(asha_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ended = [t for t in asha_sweep["trials"].values() if t.status in ("completed", "stopped early")]
    assert {t.status for t in ended} == {"completed", "stopped early"}
    for trial in ended:
        tb = asha_sweep["out"] / trial.trial / "run" / "tb"
        accumulator = EventAccumulator(str(tb), size_guidance={"tensors": 0}).Reload()
        assert "_hparams_/session_start_info" in accumulator.PluginTagToContent("hparams"), trial.trial


def test_sweep_leaves_no_ray_process_behind(asha_sweep):
    assert asha_sweep["leftover"] == []


def test_interrupted_sweep_resumes_without_redoing_finished_trials(data, tmp_path, cli):
    """Ctrl-C (SIGINT to the driver) while the second of three sequential trials runs; --resume finishes the sweep.
    (More batches per epoch keep the later trials, which reuse the first one's process, from ending before it.)"""
    longer = {**TINY_TRAIN, "schedule": {**TINY_TRAIN["schedule"], "batches_per_epoch": 8}}
    config = sweep_file(tmp_path / "sweep.yaml", {"optim.lr": {"choice": [GOOD_LR]}}, longer, trials=3,
                        scheduler="fifo")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dlscale.cli", "tune", "--data", data, "--out", out, "--config", config,
               "--cpus-per-trial", "2"]
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while len(list(out.glob("trial_*/run"))) < 2:   # trials run one at a time: the first one has ended
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(90) == 130
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert "--resume" in (tmp_path / "first.log").read_text()
    first = min(out.glob("trial_*"))
    assert (first / "run" / "model.pt").is_file()
    before = ((first / "run" / "model.pt").stat().st_mtime_ns, (first / "result.json").read_text())

    result = cli("tune", "--out", out, "--resume")
    assert result.code == 0, result.err[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    assert ((first / "run" / "model.pt").stat().st_mtime_ns, (first / "result.json").read_text()) == before


def test_two_worker_trial_runs_as_one_distributed_job(data, tmp_path, cli):
    config = sweep_file(tmp_path / "sweep.yaml", {"loss.method": {"choice": ["uncertainty"]}}, trials=1,
                        scheduler="fifo", max_failures=0)
    result = cli("tune", "--data", data, "--out", tmp_path / "out", "--config", config, "--workers-per-trial", "2")
    assert result.code == 0, result.err[-3000:]
    run_dir = next((tmp_path / "out").glob("trial_*/run"))
    assert "2 rank(s) on cpu" in (run_dir / "log.txt").read_text()
    row = next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert row["status"] == "completed" and float(row["weight recon"]) > 0
    assert ray_descendants() == []


@pytest.mark.parametrize("space, message", [
    ({"optim.learning_rate": {"loguniform": [1e-4, 1e-2]}}, "unknown config key 'optim.learning_rate'"),
    ({"optim.lr": {"loguniform": [1e-2, 1e-4]}}, "'optim.lr': loguniform range [0.01, 0.0001] is empty or inverted"),
    ({"optim.lr": {"uniform": [0.1, 0.1]}}, "is empty or inverted"),
    ({"loss.method": {"choice": []}}, "choice needs a non-empty list"),
    ({"loss.method": {"choice": ["fixed", "magic"]}}, "unknown loss weighting 'magic'"),
    ({"schedule.epochs": {"uniform": [1, 3]}}, "expected int, got 1.0"),
    ({"loss.weights.classification": {"loguniform": [0.1, 1]}}, "relative to classification"),
], ids=["unknown-key", "inverted-range", "empty-range", "empty-choice", "bad-value", "float-for-int", "reference"])
def test_bad_search_space_fails_before_ray_starts(data, tmp_path, cli, space, message):
    import ray
    result = cli("tune", "--data", data, "--out", tmp_path / "out", "--config",
                 sweep_file(tmp_path / "sweep.yaml", space, scheduler="fifo"))
    assert result.code == 2 and message in result.err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_more_workers_than_the_cluster_has_fails_before_any_trial(data, tmp_path, cli):
    config = sweep_file(tmp_path / "sweep.yaml", {"optim.lr": {"choice": [GOOD_LR]}}, scheduler="fifo")
    workers = os.cpu_count() + 1   # a local Ray has one CPU per core; each worker asks for one
    result = cli("tune", "--data", data, "--out", tmp_path / "out", "--config", config, "--workers-per-trial",
                 workers)
    assert result.code == 2, result.err[-2000:]
    assert f"a trial needs {workers} CPU(s)" in result.err and f"the Ray cluster has {workers - 1} CPU(s)" in result.err
    assert not (tmp_path / "out").exists() and ray_descendants() == []


def test_trial_larger_than_every_node_is_refused_and_concurrency_follows_resources():
    with pytest.raises(ValueError, match="no node of the Ray cluster has 4 CPU"):
        Resources(cpus=4).concurrency({"CPU": 8}, [{"CPU": 2}] * 4)
    assert Resources(workers=4).concurrency({"CPU": 8}, [{"CPU": 2}] * 4) == 2     # workers spread over nodes
    assert Resources(gpus=0.5).concurrency({"CPU": 16, "GPU": 2}, [{"CPU": 16, "GPU": 2}]) == 4
    with pytest.raises(ValueError, match="every rank needs its own whole GPUs"):
        Resources(workers=2, gpus=1)


def _has_state_api() -> bool:
    import importlib
    try:
        importlib.import_module("ray.dashboard.modules.state.state_head")
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_state_api(), reason="ray[default] is installed: its state API frees stopped trials")
def test_asha_with_distributed_trials_needs_the_state_api(data, tmp_path, cli):
    config = sweep_file(tmp_path / "sweep.yaml", {"optim.lr": {"choice": [GOOD_LR]}})
    result = cli("tune", "--data", data, "--out", tmp_path / "out", "--config", config, "--workers-per-trial", "2")
    assert result.code == 2 and "pip install 'ray[default]'" in result.err and not (tmp_path / "out").exists()
