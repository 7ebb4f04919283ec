"""The new weightings inside the real DeepSpeed engine: FAMO and UPGrad train a multitask model in one process
(ZeRO 0 and 1) and UPGrad on 2 ranks with ZeRO 2; their effective weights move away from the start and are
reported in metrics.json."""
import json
from pathlib import Path

import pytest

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"
COMMON = ["--stage", "multitask", "--schedule.epochs=2", "--schedule.batches_per_epoch=6", "--optim.lr=3e-3",
          "--optim.warmup_steps=2"]


@pytest.mark.parametrize(("method", "zero"), [("famo", 1), ("upgrad", 0), ("upgrad", 1)])
def test_weighting_trains_in_the_engine(cli, tmp_path, separable_data, tiny_args, method, zero):
    result = cli("train", "--data", separable_data, "--run-dir", tmp_path / "run", *tiny_args, *COMMON,
                 f"--loss.method={method}", f"--deepspeed.zero_stage={zero}")
    assert result.code == 0, result.err[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    weights = {k: v for k, v in metrics.items() if k.startswith("train/weight_")}
    assert set(weights) == {"train/weight_recon", "train/weight_classification"}
    start = 0.5 if method == "famo" else 1.0
    assert all(v > 0 for v in weights.values()) and any(abs(v - start) > 1e-3 for v in weights.values())


def test_upgrad_trains_on_two_ranks_with_zero_stage_2(tmp_path, launch, venv_bin, separable_data, tiny_args):
    run = tmp_path / "run"
    started = launch([venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT, "--data",
                      separable_data, "--run-dir", run, *tiny_args, *COMMON, "--loss.method=upgrad",
                      "--deepspeed.zero_stage=2"], tmp_path / "torchrun.log", tmp_path)
    assert started.wait(300) == 0, started.output()[-4000:]
    log = (run / "log.txt").read_text()
    assert "2 rank(s)" in log and "ZeRO 2, loss weighting upgrad" in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["train/weight_recon"] > 0
