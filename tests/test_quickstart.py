"""`dlscale quickstart` end to end at the tiny scale: pretraining from the simulation stream, report table, goals,
overlaid ROC and reliability figures, exported encoder, the same report from a process with another hash seed, step
reuse; and the goals' verdicts on given numbers."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import dlscale
from dlscale import io
from dlscale.cli import main
from dlscale.data.classes import CLASSES
from dlscale.quickstart_report import PROBE_GOAL, goals
from conftest import RANK_VARIABLES


@pytest.mark.slow   # the whole quickstart pipeline in subprocesses
def test_quickstart_tiny_writes_report_and_a_loadable_encoder_then_reuses_finished_steps(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--scale", "tiny"]) == 0
    report = (out / "report.md").read_text()
    for step, seed in (("pretrain", "autoencoder"), ("supervised", "supervised"), ("multitask", "multitask")):
        assert re.search(rf"^\| dlscale {step} \| \w+ \([a-z+]+\) \| small CNN width 8 \(0\.\d\dM\) \|", report,
                         re.M), step
        assert re.search(rf"^\| seed {seed} \|", report, re.M), seed
        assert (out / step / "tb").is_dir() and (out / step / "encoder.pt").is_file()
    for section in ("## What this shows", "## Goals", "## Pretraining", "## Stages",
                    "## Label efficiency of the pretrained encoder"):
        assert section in report
    assert re.search(r"^- Multi-task .* \(macro AUC 0\.\d{3} \[", report, re.M)
    assert re.search(r"^\| dlscale pretrain \| multitask \(recon\+contrastive\) \|", report, re.M)

    # pretraining saw >= 10x as many fresh simulated images as the labelled train split, counted from its run
    stream = io.read_json(out / "pretrain" / "simulation.json")
    seen = io.read_json(out / "pretrain" / "metrics.json")["step"] * stream["batch_size"] * stream["world"]
    n_train = io.read_json(out / "data" / "manifest.json")["splits"]["train"]["samples"]
    line = re.search(r"^- `pretrain` \(recon\+contrastive\) trained on ([\d,]+) fresh images .*: ([\d.]+)x the "
                     r"([\d,]+) images", report, re.M)
    assert line and int(line[1].replace(",", "")) == seen and int(line[3].replace(",", "")) == n_train
    assert seen >= 10 * n_train and float(line[2]) >= 10.0

    # label efficiency: 3 label subsets at each N, every method
    for n in (2, 5):
        for method in ("probe", "finetune", "lpft", "scratch"):
            assert re.search(rf"^\| {n} \| {method} \| [^|]+ \| 3 \| ", report, re.M), (n, method)
    assert re.search(r"^- \(b\) Linear probe at 100 labels per class >= 0\.93: not measured", report, re.M)
    assert re.search(r"^- \(c\) Multi-task >= supervised: (met|\*\*not met\*\*) \(macro AUC 0\.\d{3} vs", report,
                     re.M)
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
    warnings = [line for line in done.stderr.splitlines() if re.search(r" [WE] dlscale", line)]
    assert (again / "report.md").read_text().replace(str(again), "OUT") == report.replace(str(out), "OUT"), warnings

    stamp = (out / "supervised" / "encoder.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["quickstart", "--out", str(out), "--scale", "tiny"]) == 0
    assert (out / "supervised" / "encoder.pt").stat().st_mtime_ns == stamp   # reused, not retrained


def _cell(method: str, n: int, auc: float, low: float, high: float) -> dict:
    return {"method": method, "n_per_class": n, "mean": {"auc_macro": auc}, "ci_low": {"auc_macro": low},
            "ci_high": {"auc_macro": high}}


def _stage(auc: float, low: float, high: float) -> dict:
    return {"val/auc_macro": auc, "val/auc_macro_ci_low": low, "val/auc_macro_ci_high": high}


def test_goals_are_met_only_by_intervals_apart_and_thresholds_reached():
    """The best method from the pretrained encoder at 10 labels (here lpft; never scratch or the random control)
    must clear scratch's CI, and not fall below it with CIs apart at 100."""
    transfer = {"cells": [_cell("finetune", 10, 0.86, 0.83, 0.89), _cell("lpft", 10, 0.88, 0.85, 0.91),
                          _cell("scratch", 10, 0.82, 0.81, 0.84), _cell("random", 10, 0.95, 0.94, 0.96),
                          _cell("lpft", 100, 0.93, 0.92, 0.94), _cell("scratch", 100, 0.94, 0.93, 0.955),
                          _cell("probe", 100, PROBE_GOAL - 0.001, 0.92, 0.94)]}
    lines = goals({"supervised": _stage(0.990, 0.987, 0.992), "multitask": _stage(0.991, 0.989, 0.993)}, transfer)
    assert lines[0].startswith("- (a) The best transfer method at 10 labels per class, `lpft`, beats scratch with "
                               "95% CIs apart: met (0.880 (0.850-0.910) vs 0.820")
    assert lines[1].startswith("- (a) `lpft` is at least level with scratch at 100 labels per class (not below it "
                               "with CIs apart): met (0.930")                  # 0.94 >= 0.93: the CIs overlap
    assert "(b) Linear probe at 100 labels per class >= 0.93: **not met** (0.929" in lines[2]
    assert lines[3] == "- (c) Multi-task >= supervised: met (macro AUC 0.991 vs 0.990; the CIs overlap)."
    below = goals({}, {"cells": [_cell("lpft", 10, 0.86, 0.83, 0.89), _cell("scratch", 10, 0.84, 0.82, 0.86),
                                 _cell("lpft", 100, 0.90, 0.89, 0.91), _cell("scratch", 100, 0.94, 0.93, 0.95)]})
    assert "CIs apart: **not met** (0.860" in below[0] and "with CIs apart): **not met** (0.900" in below[1]


def test_goals_say_what_was_not_measured():
    lines = goals({}, {"cells": [_cell("probe", 100, 0.95, 0.94, 0.96)]})
    assert lines == ["- (a) The best transfer method against scratch at 10 labels per class: not measured in this "
                     "run.",
                     "- (b) Linear probe at 100 labels per class >= 0.93: met (0.950 (0.940-0.960))."]


def test_the_full_scale_pretrains_from_the_three_instrument_mixture_for_whole_stream_epochs(tmp_path, monkeypatch):
    """`--scale full` (the GPU recipe, not runnable here) resolves into a valid config: the mixture of the three
    instruments' presets, simulated on the training device, epochs of as many images as the labelled train split."""
    from dlscale import quickstart_config as qc
    monkeypatch.setattr(qc, "local_ranks", lambda: 8)
    cfg = qc.load_quickstart_config("full", given={"out": str(tmp_path / "out")})
    step = cfg.steps["pretrain"]
    train = step.train
    assert cfg.n_train == 72_000
    assert step.from_stream and train.data.source == "simulate" and train.data.simulator.device == "auto"
    assert sorted(c.preset for c in train.data.simulator.mixture.values()) == ["model_i", "model_ii", "model_iii"]
    assert train.schedule.batches_per_epoch * train.data.batch_size * 8 >= 72_000
    assert (train.schedule.batches_per_epoch - 1) * train.data.batch_size * 8 < 72_000
    assert train.schedule.epochs >= 10 and list(train.model.tasks) == ["recon", "contrastive"]
    assert (train.model.encoder.name, train.deepspeed.precision) == ("resnet18", "bf16")
    assert train.run_dir == str(tmp_path / "out" / "pretrain") and cfg.transfer.encoders == [train.run_dir]
    assert cfg.steps["multitask"].train.init_from == train.run_dir


@pytest.mark.parametrize("scale", ["tiny", "small", "full"])
def test_every_scale_prints_a_config_that_loads_back_identical(scale, tmp_path, cli):
    first = cli("quickstart", "--scale", scale, "--out", tmp_path / "qs", "--print-config")
    assert first.code == 0, first.err
    assert "# the earlier step whose encoder starts this one" in first.out
    path = tmp_path / "qs.yaml"
    path.write_text(first.out)
    again = cli("quickstart", "--config", path, "--print-config")
    assert again.code == 0, again.err
    assert again.out == first.out


def test_quickstart_overrides_reach_the_step_and_bad_keys_are_refused(tmp_path, cli):
    from dlscale.quickstart_config import load_quickstart_config
    cfg = load_quickstart_config("tiny", None, ["--steps.supervised.train.optim.lr=0.02"],
                                 {"out": str(tmp_path), "epochs": 3})
    assert cfg.steps["supervised"].train.optim.lr == 0.02
    assert {s.train.schedule.epochs for s in cfg.steps.values()} == {3} and cfg.transfer.budget.epochs == 3
    bad = cli("quickstart", "--scale", "tiny", "--print-config", "--steps.supervised.train.optim.lrr=1")
    assert bad.code == 2 and "steps.supervised.train.optim.lrr" in bad.err


def test_the_report_names_a_mixture_streams_instruments_and_shares():
    from dlscale.quickstart_report import simulated_text
    assert simulated_text({"preset": "model_ii", "mixture": {}}) == "`model_ii`"
    mixture = {"i": {"preset": "model_i", "share": 2.0}, "iii": {"preset": "model_iii", "share": 1.0}}
    assert simulated_text({"preset": "model_ii", "mixture": mixture}) == \
        "the mixture of `model_i` (share 2), `model_iii` (share 1)"


def test_a_study_is_reused_only_when_made_with_the_same_config(tmp_path, monkeypatch):
    """A finished study's results come back unchanged for its own config; another config (more label subsets) runs
    the study again from an empty directory instead of reporting the old results under the new settings."""
    from dlscale import quickstart as qs
    from dlscale.configtree import plain, to_dict
    cfg = qs.load_quickstart_config("tiny", given={"out": str(tmp_path / "out")}).transfer
    where = tmp_path / "out" / "label_efficiency"
    where.mkdir(parents=True)
    io.write_json(where / "results.json", {"config": plain(to_dict(cfg)), "cells": ["old"]})
    (where / "leftover.txt").write_text("from the old study")
    ran = []
    monkeypatch.setattr(qs, "run_transfer", lambda c: ran.append(c) or {"cells": ["new"]})
    assert qs.study(cfg, "label-efficiency", force=False)["cells"] == ["old"] and ran == []
    assert qs.study(cfg, "label-efficiency", force=True)["cells"] == ["new"] and len(ran) == 1
    assert not where.exists()                              # emptied before the study ran again
    where.mkdir()
    io.write_json(where / "results.json", {"config": plain(to_dict(cfg)), "cells": ["old"]})
    more = dataclasses.replace(cfg, repeats=cfg.repeats + 2)
    assert qs.study(more, "label-efficiency", force=False)["cells"] == ["new"] and ran[-1] is more
    assert not where.exists()
