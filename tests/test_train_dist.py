"""Training under the real launchers, 2 ranks on gloo: the deepspeed launcher, torchrun on one node, and torchrun as
two nodes (two invocations on 127.0.0.1). One launch per stage, all started together (process start-up, not
training, is the cost here); the tests check their run directories.

    deepspeed --num_gpus 2 --master_port P launch/train.py ...    (on CPU --num_gpus is needed: the default counts
                                                                   NUMA nodes; --bind_cores_to_rank stays off)
    torchrun --standalone --nproc_per_node 2 launch/train.py ...
    torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1 --master_addr 127.0.0.1 --master_port P launch/train.py ...
"""
import json
from pathlib import Path

import numpy as np
import pytest

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TIMEOUT_S = 300
TRAIN_BATCHES = 240 // (16 * 2)   # per rank and epoch


@pytest.fixture(scope="module")
def launched(tmp_path_factory, launch, venv_bin, free_ports, separable_data, tiny_args):
    """Start every launch, wait for all; {stage: (run dir, [(exit code, output) per launcher process])}."""
    root = tmp_path_factory.mktemp("launched")

    def argv(stage: str, *extra: str) -> list:
        return [TRAIN_SCRIPT, "--stage", stage, "--data", separable_data, "--run-dir", root / stage, *tiny_args,
                "--schedule.epochs=1", *extra]
    port, node_port = free_ports(2)
    started = {
        "autoencoder": [launch([venv_bin / "deepspeed", "--num_gpus", "2", "--master_port", port,
                                *argv("autoencoder")], root / "deepspeed.log", root)],
        "multitask": [launch([venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2",
                              *argv("multitask", "--data.targets=[theta_E]", "--loss.method=uncertainty")],
                             root / "torchrun.log", root)],
        "supervised": [launch([venv_bin / "torchrun", "--nnodes", "2", "--node_rank", node, "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", node_port, *argv("supervised")],
                              root / f"node{node}.log", root) for node in (0, 1)],
    }
    return {stage: (root / stage, [(p.wait(TIMEOUT_S), p.output()) for p in processes])
            for stage, processes in started.items()}


def finished_with_two_ranks(run_dir: Path, processes: list) -> dict:
    for code, output in processes:
        assert code == 0, output[-4000:]
    assert "2 rank(s)" in (run_dir / "log.txt").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == TRAIN_BATCHES
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{TRAIN_BATCHES:08d}"
    assert (run_dir / "encoder.pt").is_file() and (run_dir / "model.pt").is_file()
    return metrics


def test_autoencoder_trains_with_two_ranks_under_the_deepspeed_launcher(launched):
    metrics = finished_with_two_ranks(*launched["autoencoder"])
    assert 0 < metrics["val/recon_mse"] < 1


def test_multitask_trains_with_two_ranks_under_torchrun(launched):
    metrics = finished_with_two_ranks(*launched["multitask"])
    assert {"val/auc_macro", "val/recon_mse", "val/mae/theta_E", "train/weight_regression"} <= set(metrics)


def test_supervised_trains_with_two_ranks_launched_as_two_torchrun_nodes(launched):
    metrics = finished_with_two_ranks(*launched["supervised"])
    assert "val/auc_macro" in metrics


def test_two_node_launch_evaluates_every_val_sample_exactly_once(launched, separable_data, records):
    run_dir, _ = launched["supervised"]
    manifest = json.loads((separable_data / "manifest.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/n_samples"] == manifest["splits"]["val"]["samples"]
    ids = [tuple(i) for i in np.load(run_dir / "scores_val.npz")["ids"].tolist()]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(s.id for s in records(separable_data, "val"))
