"""`dlscale quickstart` end to end at the tiny scale: report table, overlaid ROC, exported encoder, step reuse."""
import re

import torch

import dlscale
from dlscale.cli import main
from dlscale.data.classes import CLASSES


def test_quickstart_tiny_writes_report_and_a_loadable_encoder_then_reuses_finished_steps(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--scale", "tiny"]) == 0
    report = (out / "report.md").read_text()
    for stage in ("autoencoder", "supervised", "multitask"):
        assert re.search(rf"^\| dlscale {stage} \|", report, re.M), stage
        assert re.search(rf"^\| seed {stage} \|", report, re.M), stage
        assert (out / stage / "tb").is_dir() and (out / stage / "encoder.pt").is_file()
    # numbers in the table are this run's metrics, not placeholders
    supervised_row = next(line for line in report.splitlines() if line.startswith("| dlscale supervised"))
    cells = [c.strip() for c in supervised_row.strip("|").split("|")]
    assert re.fullmatch(r"0\.\d{3}|1\.000", cells[1]) and re.match(r"0\.\d{3}|1\.000", cells[2])
    assert "0.620" in report and "0.850" in report and "datasets differ" in report
    assert (out / "roc.png").stat().st_size > 10_000

    encoder = dlscale.load_encoder(out / "multitask" / "encoder.pt")
    assert encoder.dlscale["classes"] == list(CLASSES) and encoder.dlscale["stage"] == "multitask"
    features = dlscale.models.global_pool(encoder(torch.rand(4, *encoder.dlscale["image_shape"])))
    assert features.shape[0] == 4 and torch.isfinite(features).all()

    stamp = (out / "supervised" / "encoder.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["quickstart", "--out", str(out), "--scale", "tiny"]) == 0
    assert (out / "supervised" / "encoder.pt").stat().st_mtime_ns == stamp   # reused, not retrained
