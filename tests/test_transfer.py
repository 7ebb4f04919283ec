"""`dlscale transfer`: nested stratified label subsets, the probe against a run's own probe, fine-tune and scratch on
2 ranks (with a regression target), transfer across image sizes through data.resize, the report and figures, and
`dlscale eval --data OTHER` leaving the run's own record alone.

Everything runs on the separable toy data of conftest.py with the tiny training settings; studies in this process
train in it with one rank, the 2-rank study goes through torchrun."""
import io
import json
import logging
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dlscale.data.shards import load_manifest, verify
from dlscale.transfer.subsets import ALL, nested_subsets, parse_sizes, train_index, write_subset

FAST = ["--epochs=1", "--n-bootstrap=50", "--budget.min_batches_per_epoch=2"]
SMALL = ["--data.num_workers=0", "--data.batch_size=8", "--data.shuffle_buffer=32"]


def run_cli(*argv):
    """`dlscale.cli.main` in this process -> (exit code, stdout, stderr with the log); any fixture scope."""
    from conftest import CliResult
    from dlscale.cli import main
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("transfer")


def train(stage: str, data: Path, run_dir: Path, *extra) -> Path:
    result = run_cli("train", "--stage", stage, "--data", data, "--run-dir", run_dir, *extra)
    assert result.code == 0, result.err[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def encoder_run(runs, separable_data, tiny_args) -> Path:
    """A 3-step supervised run whose probe saw the whole train split (240 < probe_samples)."""
    return train("supervised", separable_data, runs / "encoder", *tiny_args, "--schedule.epochs=1",
                 "--schedule.batches_per_epoch=3", "--eval.probe_samples=1000")


# ---- label subsets ----------------------------------------------------------------------------------------------

def test_subsets_are_stratified_nested_seeded_and_drawn_from_train_only(make_separable, records, tmp_path):
    data = make_separable(train=60, val=13)
    ids, labels = train_index(data)
    assert len(labels) == 60 and sorted(map(tuple, ids.tolist())) == sorted(s.id for s in records(data, "train"))
    sizes = parse_sizes("5,2,all")
    assert sizes == [2, 5, ALL]
    first, again, other = (nested_subsets(labels, sizes, seed, r) for seed, r in ((0, 0), (0, 0), (0, 1)))
    for subsets in (first, other):
        for n in (2, 5):
            assert np.bincount(labels[subsets[n]], minlength=3).tolist() == [n] * 3
        assert set(subsets[2]) <= set(subsets[5]) <= set(subsets[ALL]) and len(subsets[ALL]) == 60
    assert all(np.array_equal(first[n], again[n]) for n in sizes)
    assert not np.array_equal(first[5], other[5])
    assert not np.array_equal(first[5], nested_subsets(labels, sizes, 1, 0)[5])

    out = write_subset(data, ids[first[5]], tmp_path / "n5", "val", {"n_per_class": 5})
    assert verify(out) == []
    truth = {s.id: s for s in records(data, "train")}
    chosen = sorted(truth[tuple(i)].meta["source_file"] for i in ids[first[5]].tolist())
    written = records(out, "train")
    assert sorted(s.meta["source_file"] for s in written) == chosen and all(c.startswith("train/") for c in chosen)
    assert all(np.array_equal(s.image, next(t.image for t in truth.values() if t.meta == s.meta)) for s in written)
    manifest, source = load_manifest(out), load_manifest(data)
    assert manifest["splits"]["val"] == source["splits"]["val"] and set(manifest["splits"]) == {"train", "val"}
    for shard in source["splits"]["val"]["shards"]:
        assert os.path.samefile(out / shard["name"], data / shard["name"])   # a hard link, plain name
    assert manifest["source"]["of"] == str(data) and manifest["source"]["n_per_class"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_labels_per_class_beyond_a_class_count_are_refused(make_separable, encoder_run, tmp_path):
    data = make_separable(train=60, val=13)
    result = run_cli("transfer", "--encoder", encoder_run, "--data", data, "--out", tmp_path / "t",
                     "--labels-per-class", "5,21", "--methods", "probe", "--data.num_workers=0")
    assert result.code != 0 and "--labels-per-class 21" in result.err and "only 20 samples" in result.err
    assert run_cli("transfer", "--encoder", encoder_run, "--data", data, "--out", tmp_path / "t",
                   "--labels-per-class", "ten").code != 0


def test_bootstrap_draw_metrics_equal_scikit_learn_on_the_resampled_samples():
    from sklearn.metrics import r2_score, roc_auc_score
    from dlscale.transfer.scoring import weighted_metrics
    rng = np.random.default_rng(3)
    labels, target = rng.integers(0, 3, 90), rng.normal(size=(90, 1))
    probs, reg = rng.dirichlet([1, 1, 1], 90), target + rng.normal(size=(90, 1))
    probs[:30] = np.round(probs[:30], 1)                                   # tied scores count one half
    draws = rng.integers(0, 90, (4, 90))
    counts = np.stack([np.bincount(d, minlength=90) for d in draws]).astype(float)
    got = weighted_metrics({"probs": probs, "regression": reg}, labels, target, counts, 3, ["t"])
    for b, i in enumerate(draws):
        assert got["auc_macro"][b] == pytest.approx(roc_auc_score(np.eye(3)[labels[i]], probs[i]), abs=1e-12)
        assert got["accuracy"][b] == pytest.approx((probs[i].argmax(1) == labels[i]).mean(), abs=1e-12)
        assert got["mae/t"][b] == pytest.approx(np.abs(reg[i] - target[i]).mean(), abs=1e-12)
        assert got["r2/t"][b] == pytest.approx(r2_score(target[i], reg[i]), abs=1e-12)


# ---- probe ------------------------------------------------------------------------------------------------------

def test_probe_on_all_labels_equals_the_run_probe(encoder_run, separable_data, runs):
    out = runs / "probe_all"
    result = run_cli("transfer", "--encoder", encoder_run, "--data", separable_data, "--out", out, "--methods",
                     "probe,random", "--labels-per-class", "4,all", "--repeats", "2", "--data.num_workers=0",
                     "--data.batch_size=16", *FAST)
    assert result.code == 0, result.err[-3000:]
    run_metrics = json.loads((encoder_run / "metrics.json").read_text())
    cells = {(c["method"], c["n_per_class"]): c for c in json.loads((out / "results.json").read_text())["cells"]
             if c["task"] == "classification"}
    probe = cells[("probe", ALL)]
    assert len(probe["repeats"]) == 1
    assert probe["mean"]["auc_macro"] == pytest.approx(run_metrics["probe/auc_macro"], abs=1e-9)
    assert probe["mean"]["accuracy"] == pytest.approx(run_metrics["probe/accuracy"], abs=1e-9)
    assert probe["ci_low"]["auc_macro"] <= probe["mean"]["auc_macro"] <= probe["ci_high"]["auc_macro"]
    assert len(cells[("probe", 4)]["repeats"]) == 2 and len(cells[("random", ALL)]["repeats"]) == 2
    assert "| all | probe | encoder | 1 |" in result.out


# ---- fine-tune and scratch on 2 ranks, with a regression target -------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_study(runs, encoder_run, separable_data):
    out = runs / "two_ranks"
    result = run_cli("transfer", "--encoder", encoder_run, "--data", separable_data, "--out", out,
                     "--labels-per-class", "2,4", "--repeats", "1", "--ranks", "2",
                     "--task_options.classification.targets=[theta_E]",
                     "--methods", "probe,finetune,scratch,lpft,layer_decay,partial", "--tasks",
                     "classification,regression",
                     "--budget.finetune_encoder_lr_scale=0.5", "--budget.freeze_stages=1", *SMALL, *FAST)
    assert result.code == 0, result.err[-4000:]
    return out, result


@pytest.mark.slow   # the 2-rank study (torchrun)
def test_finetune_and_scratch_train_on_two_ranks_with_the_same_budget(two_rank_study, encoder_run):
    out, _ = two_rank_study
    results = json.loads((out / "results.json").read_text())
    cells = {(c["method"], c["n_per_class"]): c for c in results["cells"] if c["task"] == "classification"}
    assert {("finetune", 2), ("finetune", 4), ("scratch", 2), ("scratch", 4), ("probe", 4)} <= set(cells)
    for n in (2, 4):
        finetune, scratch = (Path(cells[(m, n)]["runs"][0]) for m in ("finetune", "scratch"))
        assert "2 rank(s)" in (finetune / "log.txt").read_text()
        assert f"encoder initialised from {encoder_run / 'encoder.pt'}" in (finetune / "log.txt").read_text()
        assert "encoder initialised" not in (scratch / "log.txt").read_text()
        lr_scales = [yaml.safe_load((d / "config.yaml").read_text())["optim"]["encoder_lr_scale"]
                     for d in (finetune, scratch)]
        assert lr_scales == [0.5, 1.0]              # only the pretrained encoder learns gently
        for run in (finetune, scratch):   # the head refitted to eval-mode features of exactly the subset's images
            assert json.loads((run / "metrics.json").read_text())["refit/samples"] == 3 * n
        steps = [json.loads((d / "metrics.json").read_text())["step"] for d in (finetune, scratch)]
        assert steps[0] == steps[1] == 2            # 1 epoch of the floor of 2 batches: the same budget
        assert (finetune / "tb").is_dir()
        manifest = load_manifest(_data_dir(finetune))
        assert manifest["splits"]["train"]["samples"] == 3 * n
    for cell in cells.values():
        assert {"accuracy", "auc_macro", "mae/theta_E", "r2/theta_E"} <= set(cell["mean"])


@pytest.mark.slow   # the 2-rank study (torchrun)
def test_lpft_layer_decay_and_partial_train_on_two_ranks_with_the_fine_tune_budget(two_rank_study, encoder_run):
    out, _ = two_rank_study
    results = json.loads((out / "results.json").read_text())
    assert {"lpft", "layer_decay", "partial"} <= set(results["methods"])
    cells = {(c["method"], c["n_per_class"]): c for c in results["cells"] if c["task"] == "classification"}
    regression = {(c["method"], c["n_per_class"]): c for c in results["cells"] if c["task"] == "regression"}
    for n in (2, 4):
        runs = {m: Path(cells[(m, n)]["runs"][0]) for m in ("finetune", "lpft", "layer_decay", "partial")}
        configs = {m: yaml.safe_load((d / "config.yaml").read_text()) for m, d in runs.items()}
        logs = {m: (d / "log.txt").read_text() for m, d in runs.items()}
        for method, run in runs.items():
            assert "2 rank(s)" in logs[method] and f"encoder initialised from {encoder_run / 'encoder.pt'}" in \
                logs[method]
            assert json.loads((run / "metrics.json").read_text())["step"] == 2   # the fine-tune budget
            assert configs[method]["optim"]["encoder_lr_scale"] == 0.5
        assert f"heads fitted before training on {3 * n} images" in logs["lpft"]
        assert "heads fitted" not in logs["finetune"]
        options = {m: (c["optim"]["layer_decay"], c["optim"]["freeze_stages"],
                       c["model"]["task_options"]["classification"]["probe_init"]) for m, c in configs.items()}
        assert options == {"finetune": (1.0, 0, False), "lpft": (1.0, 0, True), "layer_decay": (0.75, 0, False),
                           "partial": (1.0, 1, False)}
        assert {"accuracy", "auc_macro"} <= set(cells[("lpft", n)]["mean"])
        lpft = Path(regression[("lpft", n)]["runs"][0])   # regression-only: the ridge probe of the whole subset
        assert "2 rank(s)" in (lpft / "log.txt").read_text()
        assert f"heads fitted before training on {3 * n} images" in (lpft / "log.txt").read_text()
        assert json.loads((lpft / "metrics.json").read_text())["step"] == 2
        head = yaml.safe_load((lpft / "config.yaml").read_text())["model"]["task_options"]["regression"]
        assert (head["loss"], head["tta"]) == ("mse", True)   # the study's defaults; theta_E is rotation-invariant
        assert np.isfinite(regression[("lpft", n)]["mean"]["mae/theta_E"])


def _data_dir(run_dir: Path) -> str:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["data_dir"]


@pytest.mark.slow   # the 2-rank study (torchrun)
def test_report_table_and_figures_are_written(two_rank_study, encoder_run, separable_data):
    out, result = two_rank_study
    report = (out / "report.md").read_text()
    assert "| labels/class | method | encoder | repeats | accuracy (95% CI) | macro AUC (95% CI) |" in report
    assert "MAE theta_E (95% CI)" in report and "two-level bootstrap" in report
    assert f"trained on `{separable_data}`" in report and "the data of this study" in report
    assert "fine-tuned encoders learn at 0.5x the learning rate of their new head" in report
    rows = [line for line in report.splitlines() if line.startswith("| 4 | finetune |")]
    assert len(rows) == 2 and rows[0] in result.out      # one row in each task's table
    for figure in ("label_efficiency.png", "regression_scatter.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow   # the 2-rank study (torchrun)
def test_a_second_call_reuses_the_finished_runs(two_rank_study, encoder_run, separable_data):
    out, _ = two_rank_study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("model.pt")}
    result = run_cli("transfer", "--encoder", encoder_run, "--data", separable_data, "--out", out,
                     "--labels-per-class", "2,4", "--repeats", "1", "--ranks", "2",
                     "--task_options.classification.targets=[theta_E]",
                     "--methods", "finetune,scratch", "--tasks", "classification",
                     "--budget.finetune_encoder_lr_scale=0.5", *SMALL, *FAST)
    assert result.code == 0, result.err[-3000:]
    assert "4 of 4 fine-tune/scratch runs finished before" in result.err
    assert before and {p: p.stat().st_mtime_ns for p in before} == before
    # other settings (2 epochs): the run is trained again, here in this process
    result = run_cli("transfer", "--encoder", encoder_run, "--data", separable_data, "--out", out,
                     "--labels-per-class", "2", "--repeats", "1", "--ranks", "1",
                     "--task_options.classification.targets=[theta_E]",
                     "--methods", "scratch", "--tasks", "classification", *SMALL, *FAST, "--epochs=2")
    assert result.code == 0, result.err[-3000:]
    assert "0 of 1 fine-tune/scratch runs finished before" in result.err and "of other settings" in result.err
    retrained = json.loads((out / "results.json").read_text())["cells"][0]["runs"][0]
    assert json.loads((Path(retrained) / "metrics.json").read_text())["step"] == 4
    # a run trained in this process is reused as well (its training must not change the planned config it records)
    stamp = (Path(retrained) / "model.pt").stat().st_mtime_ns
    result = run_cli("transfer", "--encoder", encoder_run, "--data", separable_data, "--out", out,
                     "--labels-per-class", "2", "--repeats", "1", "--ranks", "1",
                     "--task_options.classification.targets=[theta_E]",
                     "--methods", "scratch", "--tasks", "classification", *SMALL, *FAST, "--epochs=2")
    assert result.code == 0, result.err[-3000:]
    assert (Path(retrained) / "model.pt").stat().st_mtime_ns == stamp


# ---- another image size: Model-I-like 150x150 encoder on 64x64 data ---------------------------------------------

@pytest.fixture(scope="module")
def encoder_150(runs, make_separable, tiny_args) -> Path:
    """An encoder trained (2 steps) on Model-I-sized 150x150 images."""
    data = make_separable(train=48, val=12, side=150)
    return train("supervised", data, runs / "enc150", *tiny_args, "--schedule.epochs=1",
                 "--schedule.batches_per_epoch=2")


def test_an_encoder_of_another_image_size_needs_data_resize(encoder_150, make_separable, tmp_path, tiny_args):
    data = make_separable(train=48, val=15, side=64)
    result = run_cli("transfer", "--encoder", encoder_150, "--data", data, "--out", tmp_path / "t", "--methods",
                     "probe")
    assert result.code != 0 and "[1, 150, 150]" in result.err and "[1, 64, 64]" in result.err
    assert "--data.resize=150" in result.err and not (tmp_path / "t").exists()
    result = run_cli("train", "--stage", "supervised", "--data", data, "--run-dir", tmp_path / "run", *tiny_args,
                     "--init-from", encoder_150)
    assert result.code != 0 and "--data.resize=150" in result.err and not (tmp_path / "run").exists()


def test_an_encoder_of_another_image_size_transfers_with_data_resize(encoder_150, make_separable, runs,
                                                                    tiny_args):
    data = make_separable(train=48, val=15, side=64)
    out = runs / "resized"
    result = run_cli("transfer", "--encoder", encoder_150, "--data", data, "--out", out, "--methods",
                     "probe,finetune", "--labels-per-class", "4", "--repeats", "1", "--ranks", "1",
                     "--tasks", "classification", "--data.resize=150", *SMALL, *FAST)
    assert result.code == 0, result.err[-3000:]
    cells = {c["method"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    exported = torch.load(Path(cells["finetune"]["runs"][0]) / "encoder.pt", weights_only=True)
    assert exported["image_shape"] == [1, 150, 150]
    assert exported["data"]["image_shape"] == [1, 64, 64] and exported["data"]["resize"] == 150
    assert 0 <= cells["probe"]["mean"]["auc_macro"] <= 1
    report = (out / "report.md").read_text()
    assert "resized to 150x150" in report and "transfer to other data" in report and "[1, 150, 150]" in report


# ---- dlscale eval on other data ---------------------------------------------------------------------------------

def test_eval_on_other_data_leaves_the_run_metrics_byte_identical(encoder_run, make_separable):
    other = make_separable(train=30, val=12)
    before = (encoder_run / "metrics.json").read_bytes()
    result = run_cli("eval", "--run-dir", encoder_run, "--data", other, "--split", "val")
    assert result.code == 0, result.err[-3000:]
    assert (encoder_run / "metrics.json").read_bytes() == before
    written = encoder_run / "eval" / f"{other.resolve().name}-val"
    assert json.loads((written / "metrics.json").read_text())["val/n_samples"] == 12
    assert f"-> {written}" in result.out and "macro AUC" in result.out and "accuracy" in result.out
