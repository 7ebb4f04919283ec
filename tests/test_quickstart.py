"""`dlscale quickstart` end to end at the tiny scale: report table, overlaid ROC and reliability figures, exported
encoder, the same report from a process with another hash seed, step reuse."""
import os
import re
import subprocess
import sys

import pytest
import torch

import dlscale
from dlscale.cli import main
from dlscale.data.classes import CLASSES
from conftest import RANK_VARIABLES

pytestmark = pytest.mark.slow   # the whole quickstart pipeline in subprocesses


def test_quickstart_tiny_writes_report_and_a_loadable_encoder_then_reuses_finished_steps(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--scale", "tiny"]) == 0
    report = (out / "report.md").read_text()
    for step, seed in (("pretrain", "autoencoder"), ("supervised", "supervised"), ("multitask", "multitask")):
        assert re.search(rf"^\| dlscale {step} \| \w+ \| small CNN width 8 \(0\.\d\dM\) \|", report, re.M), step
        assert re.search(rf"^\| seed {seed} \|", report, re.M), seed
        assert (out / step / "tb").is_dir() and (out / step / "encoder.pt").is_file()
    for section in ("## What this shows", "## Stages", "## Label efficiency of the pretrained encoder"):
        assert section in report
    assert re.search(r"^- Multi-task .* \(macro AUC 0\.\d{3} \[", report, re.M)
    assert re.search(r"^\| 5 \| finetune \| ", report, re.M) and re.search(r"^\| 2 \| scratch \| ", report, re.M)
    assert (out / "label_efficiency" / "label_efficiency.png").stat().st_size > 10_000
    # numbers in the table are this run's metrics, not placeholders
    supervised_row = next(line for line in report.splitlines() if line.startswith("| dlscale supervised"))
    cells = [c.strip() for c in supervised_row.strip("|").split("|")]
    assert re.fullmatch(r"0\.\d{3}|1\.000", cells[3]) and re.fullmatch(r"0\.\d{3}", cells[4])   # accuracy, ECE
    assert re.match(r"0\.\d{3}|1\.000", cells[5])
    assert "0.620" in report and "0.850" in report and "datasets differ" in report
    assert (out / "roc.png").stat().st_size > 10_000 and (out / "reliability.png").stat().st_size > 10_000

    encoder = dlscale.load_encoder(out / "multitask" / "encoder.pt")
    assert encoder.dlscale["classes"] == list(CLASSES) and encoder.dlscale["stage"] == "multitask"
    features = dlscale.models.global_pool(encoder(torch.rand(4, *encoder.dlscale["image_shape"])))
    assert features.shape[0] == 4 and torch.isfinite(features).all()

    # the same pipeline in a process of its own, with another PYTHONHASHSEED: the same report
    again = tmp_path / "qs_again"
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "dlscale.cli", "quickstart", "--out", str(again), "--scale", "tiny"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (again / "report.md").read_text().replace(str(again), "OUT") == report.replace(str(out), "OUT")

    stamp = (out / "supervised" / "encoder.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["quickstart", "--out", str(out), "--scale", "tiny"]) == 0
    assert (out / "supervised" / "encoder.pt").stat().st_mtime_ns == stamp   # reused, not retrained

