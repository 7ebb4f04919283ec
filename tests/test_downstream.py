"""`dlscale transfer --tasks`: the downstream-task registry (regression, anomaly, superres, and one registered in
this file), their metrics against reference computations, refusals before any training, cross-dataset scoring.

Runs on the separable toy data of conftest.py (theta_E in the metadata follows the class) with a 3-step encoder."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_transfer import run_cli, train

from dlscale.data.shards import load_manifest
from dlscale.transfer.tasks.superres import SuperresOptions

FAST = ["--n-bootstrap=50", "--data.num_workers=0", "--data.batch_size=16", "--task_options.superres.steps=10",
        "--task_options.superres.eval_images=24"]


# ---- metrics against reference computations ---------------------------------------------------------------------

def test_psnr_and_ssim_equal_a_hand_computation_on_fixed_arrays():
    from dlscale.transfer.tasks.superres import per_image
    rng = np.random.default_rng(0)
    target = rng.random((2, 1, 16, 16))
    pred = np.clip(target + 0.05 * rng.standard_normal(target.shape), 0, 1)
    got = per_image(torch.from_numpy(pred), torch.from_numpy(target))
    mse = ((pred - target) ** 2).reshape(2, -1).mean(1)
    assert got["psnr"] == pytest.approx(10 * np.log10(1.0 / mse), abs=1e-5)   # torchmetrics: float32 range
    # SSIM: the 11x11 Gaussian window (sigma 1.5) at every pixel of the reflect-padded image, averaged
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    window = np.outer(g / g.sum(), g / g.sum())
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    for i in range(2):
        x, y, values = np.pad(pred[i, 0], 5, mode="reflect"), np.pad(target[i, 0], 5, mode="reflect"), []
        for r in range(16):
            for c in range(16):
                a, b = x[r:r + 11, c:c + 11], y[r:r + 11, c:c + 11]
                mx, my = (window * a).sum(), (window * b).sum()
                vx, vy = (window * a * a).sum() - mx ** 2, (window * b * b).sum() - my ** 2
                cov = (window * a * b).sum() - mx * my
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        assert got["ssim"][i] == pytest.approx(np.mean(values), abs=1e-6)


def test_anomaly_auroc_equals_scikit_learn_on_the_same_scores():
    from sklearn.metrics import roc_auc_score
    from dlscale.transfer.tasks.anomaly import anomaly_scores, auroc_metrics
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 120)
    features = rng.normal(size=(120, 6)) + labels[:, None] * 0.4
    normal = rng.normal(size=(30, 6))
    scores = anomaly_scores(normal, features)
    scores["knn"][:20] = np.round(scores["knn"][:20], 1)                   # ties count one half
    draws = np.vstack([np.ones(120), np.bincount(rng.integers(0, 120, 120), minlength=120)])
    got = auroc_metrics(scores, labels, draws)
    resampled = np.repeat(np.arange(120), draws[1].astype(int))
    for against, keep in (("cdm", labels != 2), ("axion", labels != 1), ("both", labels >= 0)):
        for name in ("knn", "mahalanobis"):
            for b, index in enumerate((np.flatnonzero(keep), resampled[keep[resampled]])):
                expected = roc_auc_score(labels[index] != 0, scores[name][index])
                assert got[f"auroc_{name}/{against}"][b] == pytest.approx(expected, abs=1e-12)


def test_the_generic_bootstrap_reports_per_repeat_points_and_a_ci_around_the_mean():
    from dlscale.transfer.bootstrap import summarize_draws, weighted_mean
    values = [np.linspace(0, 1, 50), np.linspace(0.2, 1.2, 50)]
    out = summarize_draws(lambda r, counts: {"m": weighted_mean(values[r], counts)}, 2, 50, 200, 0)
    assert [m["m"] for m in out["repeats"]] == pytest.approx([0.5, 0.7])
    assert out["mean"]["m"] == pytest.approx(0.6) and out["ci_low"]["m"] < 0.6 < out["ci_high"]["m"]


# ---- refusals before any training -------------------------------------------------------------------------------

class _Source:
    def __init__(self, side):
        self.image_shape = (1, side, side)


class _Study:
    def __init__(self, side=32, labels=(0, 1, 2)):
        self.sources = [_Source(side)]
        self.train_labels = np.array(labels)
        self.manifest = {"splits": {"val": {"class_counts": {"no_sub": 3, "cdm": 3, "axion": 3}}}}
        self.eval_manifest = None
        self.cfg = type("Cfg", (), {"split": "val", "data_dir": "d", "eval_dir": "d",
                                    "options": staticmethod(lambda task: SuperresOptions())})()


def test_tasks_the_data_cannot_serve_are_refused_naming_the_task_and_its_needs():
    from dlscale.transfer.tasks.anomaly import Anomaly
    from dlscale.transfer.tasks.superres import SuperResolution
    task = SuperResolution()
    assert task.unmet(_Study(32)) is None
    for side in (10, 33):     # too small for SSIM's window; odd
        why = task.unmet(_Study(side))
        assert why and "--tasks superres" in str(task.refuse(why)) and f"{side}x{side}" in why
    assert Anomaly().unmet(_Study(labels=(1, 2))) and "no no_sub" in Anomaly().unmet(_Study(labels=(1, 2)))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, separable_data, tiny_args) -> Path:
    return train("supervised", separable_data, tmp_path_factory.mktemp("downstream") / "enc", *tiny_args,
                 "--schedule.epochs=1", "--schedule.batches_per_epoch=3")


def test_a_regression_target_that_does_not_vary_is_refused_before_any_work(encoder, separable_data, tmp_path):
    result = run_cli("transfer", "--encoder", encoder, "--data", separable_data, "--out", tmp_path / "t",
                     "--tasks", "regression", "--task_options.regression.targets=[e1]", "--methods", "probe",
                     "--labels-per-class", "4", *FAST)
    assert result.code != 0 and "--tasks regression" in result.err and "e1" in result.err
    assert "the task needs" in result.err and not (tmp_path / "t").exists()
    result = run_cli("transfer", "--encoder", encoder, "--data", separable_data, "--out", tmp_path / "t",
                     "--tasks", "nosuchtask", "--labels-per-class", "4", *FAST)
    assert result.code != 0 and "unknown downstream task 'nosuchtask'" in result.err


# ---- the whole study, with a task registered here -----------------------------------------------------------------

from dlscale.transfer.tasks import DOWNSTREAM, Anchor, DownstreamTask, cell, summarize  # noqa: E402
from dlscale.transfer.bootstrap import weighted_mean  # noqa: E402


@DOWNSTREAM.register
class BrightnessTask(DownstreamTask):
    """A downstream task defined outside dlscale: the mean feature of each eval image, scored as a mean."""
    name = "test_brightness"
    needs = "any images"
    metrics = ("mean_feature",)
    anchors = (Anchor("mean_feature", 1.0, "a made-up reference", "this test file"),)
    note = "registered in tests/test_downstream.py"

    def run(self, study):
        source = study.sources[0]
        values = study.frozen_features(source, None, study.cfg.split)["features"].mean(1).astype(float)
        return [cell(self.name, "probe", source.label, n, 0,
                     summarize(lambda r, counts: {"mean_feature": weighted_mean(values, counts)}, 1, len(values),
                               study)) for n in study.cfg.labels_per_class]


@pytest.fixture(scope="module")
def study(encoder, separable_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("downstream") / "study"
    result = run_cli("transfer", "--encoder", encoder, "--data", separable_data, "--out", out, "--tasks",
                     "classification,regression,anomaly,superres,test_brightness", "--methods", "probe,random",
                     "--labels-per-class", "4,all", "--repeats", "2", *FAST)
    assert result.code == 0, result.err[-3000:]
    return out, result, json.loads((out / "results.json").read_text())


def test_every_task_writes_cells_naming_their_task_with_cis(study):
    out, result, results = study
    tasks = {c["task"] for c in results["cells"]}
    assert tasks == {"classification", "regression", "anomaly", "superres", "test_brightness"}
    by = {(c["task"], c["method"], c["n_per_class"]): c for c in results["cells"]}
    for task, method, metric in (("regression", "probe", "mae/theta_E"), ("anomaly", "probe", "auroc_knn/both"),
                                 ("superres", "frozen", "psnr"), ("superres", "scratch", "ssim_cdm"),
                                 ("superres", "finetune", "psnr_axion"), ("test_brightness", "probe", "mean_feature"),
                                 ("classification", "probe", "auc_macro")):
        c = by[(task, method, 4)]
        assert c["ci_low"][metric] <= c["mean"][metric] <= c["ci_high"][metric], (task, metric)
        assert len(c["repeats"]) == (1 if task == "test_brightness" else 2)
    assert len(by[("regression", "probe", "all")]["repeats"]) == 1
    assert len(by[("anomaly", "random", 4)]["repeats"]) == 2
    assert by[("anomaly", "probe", 4)]["n_train"] == 4                       # the no_sub images only
    for score in ("knn", "mahalanobis", "stages", "svdd"):                     # the classes separate
        assert by[("anomaly", "probe", "all")]["mean"][f"auroc_{score}/both"] > 0.8, score
    assert by[("regression", "probe", "all")]["mean"]["r2/theta_E"] > 0.5
    for method in ("scratch", "frozen", "finetune"):     # 10 steps from bicubic: not worse than it
        assert by[("superres", method, 4)]["mean"]["psnr"] > by[("superres", "bicubic", 4)]["mean"]["psnr"] - 1
    assert "log10_axion_mass" not in json.dumps(results["tasks"][1]["metrics"])   # no axion mass in this data


def test_the_report_has_a_table_per_task_with_anchors_and_the_figures(study):
    out, result, results = study
    report = (out / "report.md").read_text()
    for name in ("classification", "regression", "anomaly", "superres", "test_brightness"):
        assert f"## Task: {name}" in report
    assert "anchor (other data)" in report
    assert "adversarial autoencoder (reconstruction error) auroc_recon/both 0.932" in report
    assert "github.com/DeepLense-Unsupervised/unsupervised-lensing" in report
    assert "a made-up reference mean_feature 1" in report and "registered in tests/test_downstream.py" in report
    assert "| 4 | probe | enc | 1 | 0 | " in report                               # the test task's row
    assert "## Task: anomaly" in result.out
    for figure in ("label_efficiency.png", "label_efficiency_tasks.png", "regression_downstream.png",
                   "superres_examples.png", "anomaly_scores.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tasks_all_scores_on_another_dataset(encoder, separable_data, make_separable, tmp_path):
    other = make_separable(train=30, val=18)
    result = run_cli("transfer", "--encoder", encoder, "--data", separable_data, "--eval-data", other, "--out",
                     tmp_path / "x", "--tasks", "anomaly,regression", "--methods", "probe", "--labels-per-class",
                     "4", "--repeats", "1", *FAST)
    assert result.code == 0, result.err[-3000:]
    results = json.loads((tmp_path / "x" / "results.json").read_text())
    assert results["eval_samples"] == 18 and results["eval_data"] == str(other)
    assert {c["task"] for c in results["cells"]} == {"anomaly", "regression"}
    assert "Cross-dataset" in (tmp_path / "x" / "report.md").read_text()
    refused = run_cli("transfer", "--encoder", encoder, "--data", separable_data, "--eval-data", other, "--out",
                      tmp_path / "y", "--methods", "probe,finetune", "--labels-per-class", "4", *FAST)
    assert refused.code != 0 and "--eval-data" in refused.err and not (tmp_path / "y").exists()


# ---- the default: every task the data can serve --------------------------------------------------------------------

def test_the_default_runs_every_task_the_data_can_serve_and_logs_the_skipped(encoder, separable_data, tmp_path):
    result = run_cli("transfer", "--encoder", encoder, "--data", separable_data, "--out", tmp_path / "d",
                     "--methods", "probe", "--labels-per-class", "4", "--repeats", "1",
                     "--task_options.regression.targets=[e1]",
                     *FAST)
    assert result.code == 0, result.err[-3000:]
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert {c["task"] for c in results["cells"]} == {"classification", "anomaly", "test_brightness"}
    skipped = [line for line in result.err.splitlines() if "skipping downstream task" in line]
    assert len(skipped) == 1 and "regression" in skipped[0] and "e1" in skipped[0] and "needs" in skipped[0]
    assert "downstream task superres runs only when asked (--tasks superres)" in result.err


# ---- regression: fine-tune against scratch, the axion mass on axion images only -----------------------------------

@pytest.fixture(scope="module")
def axion_data(tmp_path_factory) -> Path:
    """Separable 1x32x32 images; theta_E on every image, axion_mass (eV, following the image's noise) on axion only."""
    from conftest import separable_image
    from dlscale.data.classes import CLASSES
    from dlscale.data.shards import DatasetWriter
    out, rng = tmp_path_factory.mktemp("axion") / "data", np.random.default_rng(2)
    with DatasetWriter(out, (1, 32, 32), {"kind": "test"}, shard_size=50, samples_per_record=8) as w:
        for split, n in (("train", 60), ("val", 30)):
            for i in range(n):
                label = i % 3
                mass = 10.0 ** (-23 + rng.random()) if CLASSES[label] == "axion" else None
                w.add(split, separable_image(rng, label, 32), label,
                      {"class": CLASSES[label], "source_file": f"{split}/{i}", "axion_mass": mass,
                       "theta_E": 0.5 + 0.3 * label + 0.05 * float(rng.standard_normal())})
    return out


def test_regression_fine_tune_lpft_and_scratch_cells_have_finite_mae_and_r2(encoder, axion_data, tmp_path):
    out = tmp_path / "reg"
    result = run_cli("transfer", "--encoder", encoder, "--data", axion_data, "--out", out, "--tasks", "regression",
                     "--methods", "probe,finetune,lpft,scratch", "--labels-per-class", "4", "--repeats", "1",
                     "--ranks", "1", "--epochs=1", "--budget.min_batches_per_epoch=2", *FAST, "--data.batch_size=8")
    assert result.code == 0, result.err[-3000:]
    cells = {(c["method"], c["n_per_class"]): c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert {("probe", 4), ("finetune", 4), ("lpft", 4), ("scratch", 4)} <= set(cells)
    for method in ("finetune", "lpft", "scratch"):
        c = cells[(method, 4)]
        for metric in ("mae/log10_axion_mass", "r2/log10_axion_mass", "mae/theta_E", "r2/theta_E"):
            assert np.isfinite(c["mean"][metric]) and c["ci_low"][metric] <= c["ci_high"][metric], (method, metric)
        assert len(c["runs"]) == 2                                   # one run per target group
    import yaml
    runs = {(m, "axion" in r): Path(r) for m in ("finetune", "lpft", "scratch") for r in cells[(m, 4)]["runs"]}
    for is_mass in (True, False):
        finetune, scratch = runs[("finetune", is_mass)], runs[("scratch", is_mass)]
        lpft = (runs[("lpft", is_mass)] / "log.txt").read_text()   # the ridge probe of the images carrying the targets
        assert f"heads fitted before training on {4 if is_mass else 12} images" in lpft
        assert "heads fitted" not in (finetune / "log.txt").read_text()
        assert f"encoder initialised from {encoder / 'encoder.pt'}" in (finetune / "log.txt").read_text()
        assert "encoder initialised" not in (scratch / "log.txt").read_text()
        steps = [json.loads((d / "metrics.json").read_text())["step"] for d in (finetune, scratch)]
        assert steps[0] == steps[1] == 2                             # the same budget
        config = yaml.safe_load((finetune / "config.yaml").read_text())
        assert config["stage"] == "multitask" and config["model"]["tasks"] == ["regression"]
    mass_data = load_manifest(yaml.safe_load((runs[("finetune", True)] / "config.yaml").read_text())["data_dir"])
    assert mass_data["splits"]["train"]["samples"] == 4 and mass_data["splits"]["val"]["samples"] == 10
    assert mass_data["splits"]["train"]["class_counts"] == {"no_sub": 0, "cdm": 0, "axion": 4}


# ---- anomaly by reconstruction error -------------------------------------------------------------------------------

def test_recon_error_is_scored_for_encoders_with_a_decoder_only(encoder, separable_data, tiny_args, tmp_path):
    from sklearn.metrics import roc_auc_score
    ae = train("autoencoder", separable_data, tmp_path / "ae", *tiny_args, "--schedule.epochs=1",
               "--schedule.batches_per_epoch=3")
    out = tmp_path / "anomaly"
    result = run_cli("transfer", "--encoder", ae, "--encoder", encoder, "--data", separable_data, "--out", out,
                     "--tasks", "anomaly", "--methods", "probe", "--labels-per-class", "4", "--repeats", "1", *FAST)
    assert result.code == 0, result.err[-3000:]
    cells = json.loads((out / "results.json").read_text())["cells"]
    recon = [c for c in cells if c["method"] == "recon_error"]
    assert [(c["model"], c["n_per_class"]) for c in recon] == [("ae", 4)]      # the supervised encoder: no row
    with np.load(ae / "scores_val.npz") as z:                                    # the run's own eval of the split
        expected = roc_auc_score(z["labels"] != 0, z["recon_mse"])
    c = recon[0]
    assert c["mean"]["auroc_recon/both"] == pytest.approx(expected, abs=1e-3)
    assert c["ci_low"]["auroc_recon/both"] <= c["mean"]["auroc_recon/both"] <= c["ci_high"]["auroc_recon/both"]
    assert "| 4 | recon_error | ae |" in (out / "report.md").read_text()


def test_stage_scores_find_an_anomaly_only_an_early_stage_sees_and_deep_svdd_learns_from_normals_only():
    from sklearn.metrics import roc_auc_score
    from dlscale.transfer.tasks.anomaly import deep_svdd, stage_scores
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 100)
    early = rng.normal(size=(200, 8)) + labels[:, None] * 1.5          # the anomaly shifts the early stage only
    late = rng.normal(size=(200, 16))
    normal = [rng.normal(size=(300, 8)), rng.normal(size=(300, 16))]
    scores = stage_scores(normal, [early, late], seed=0)
    assert roc_auc_score(labels, scores["stages"]) > 0.9
    assert roc_auc_score(labels, scores["svdd"]) > 0.7
    assert np.array_equal(stage_scores(normal, [early, late], seed=0)["svdd"], scores["svdd"])   # seeded
    assert not np.array_equal(deep_svdd(normal[0], early, seed=1), deep_svdd(normal[0], early, seed=0))
    assert roc_auc_score(labels, stage_scores([normal[1]], [late], seed=0)["stages"]) < 0.65   # late: blind


def test_stage_features_are_each_stage_s_pooled_output_then_the_encoder_s():
    import torch
    from dlscale.models import EncoderConfig, build_encoder, global_pool
    from dlscale.transfer.features import FeatureModel, stage_modules
    encoder = build_encoder(EncoderConfig(name="small", width=4), (1, 16, 16)).eval()
    model = FeatureModel(encoder, False, stage_modules(encoder))
    images = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        got = model(images)["features"]
        first = encoder[0](images)
        expected = torch.cat([global_pool(first), global_pool(encoder[1](first)), global_pool(encoder(images))], 1)
    assert model.widths == [4, 8, 16] and torch.allclose(got, expected)
