"""AdaBN (`dlscale adapt-bn`): every BatchNorm of the adapted run holds the exact statistics of its inputs over the
target's images (the first against a direct computation from the stored images), the adapted run's exports and
`dlscale predict` use them, target labels never reach them (nor a head refit, nor self-training, which repeats
exactly), and bad input is refused before anything is written."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_split
from dlscale.data.transforms import normalize
from dlscale.export import load_encoder
from dlscale.train.adabn import batchnorm_layers
from dlscale.train.evaluation import load_run
from test_adapt import write_target
from test_predict import run_cli

HEAD_NORM = "heads.classification.norm"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adabn")


@pytest.fixture(scope="module")
def source_run(work, separable_data, tiny_args) -> Path:
    run = work / "source"
    result = run_cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", run, *tiny_args,
                     "--schedule.epochs=1", "--schedule.batches_per_epoch=6", "--eval.probe_samples=0")
    assert result.code == 0, result.err[-3000:]
    return run


@pytest.fixture(scope="module")
def target(work) -> Path:
    return write_target(work / "target", splits=(("train", 120), ("val", 30)))


def adapt(run: Path, target: Path, out: Path, *extra):
    return run_cli("adapt-bn", "--run-dir", run, "--target-data", target, "--out", out, *extra)


@pytest.fixture(scope="module")
def adapted(work, source_run, target) -> Path:
    result = adapt(source_run, target, work / "adapted")
    assert result.code == 0, result.err[-3000:]
    return work / "adapted"


def target_images(target: Path, split: str = "train") -> torch.Tensor:
    """The split's images straight from the tars, normalised as the run's evaluation does (per-image minmax)."""
    images = torch.from_numpy(np.stack([s.image for s in read_split(target, split)]))
    return normalize(images, "minmax")


def layer_inputs(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every BatchNorm's input over `images` (eval mode), as (channels, values)."""
    seen: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].transpose(0, 1)
                                                                                        .flatten(1).double()))
             for n, m in batchnorm_layers(model).items()]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v, dim=1) for n, v in seen.items()}


def test_the_first_batchnorm_holds_the_statistics_of_its_inputs_computed_directly(adapted, target):
    _, model, _ = load_run(adapted)
    conv, bn = model.encoder[0][0], model.encoder[0][1]
    with torch.no_grad():
        inputs = conv(target_images(target)).double().transpose(0, 1).flatten(1)
    assert torch.allclose(bn.running_mean.double(), inputs.mean(1), atol=1e-5)
    assert torch.allclose(bn.running_var.double(), inputs.var(1), rtol=1e-4, atol=1e-6)


def test_every_batchnorm_head_included_normalises_the_adapted_model_s_target_inputs_exactly(adapted, source_run,
                                                                                            target):
    _, model, _ = load_run(adapted)
    _, source, _ = load_run(source_run)
    inputs = layer_inputs(model, target_images(target))
    layers = batchnorm_layers(model)
    assert HEAD_NORM in inputs and set(inputs) == set(layers)
    for name, x in inputs.items():
        assert torch.allclose(layers[name].running_mean.double(), x.mean(1), atol=1e-4), name
        assert torch.allclose(layers[name].running_var.double(), x.var(1), rtol=1e-3, atol=1e-6), name
        assert not torch.allclose(layers[name].running_mean, batchnorm_layers(source)[name].running_mean), name
    weights = {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in weights.items())   # only statistics changed


def test_the_adapted_run_records_its_provenance_and_exports_the_adapted_encoder(adapted, source_run, target):
    record = json.loads((adapted / "adabn.json").read_text())
    assert record["source_run"] == str(source_run.resolve()) and record["target_data"] == str(target.resolve())
    assert record["images"] == 120 and record["split"] == "train" and HEAD_NORM in record["adapted"]
    assert record["kept"] == []
    meta = json.loads((adapted / "encoder.json").read_text())
    assert meta["adabn"]["images"] == 120 and meta["data"]["dir"] == str(target)
    _, model, _ = load_run(adapted)
    for path in (adapted / "encoder.pt", adapted / "encoder.safetensors"):
        exported = load_encoder(path).state_dict()
        assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in exported.items()), path


def read_probs(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r[k]) for k in ("prob_no_sub", "prob_cdm", "prob_axion")] for r in rows])


def test_predict_with_the_adapted_run_uses_the_target_statistics(adapted, source_run, target, work):
    outs = {}
    for name, run in (("adapted", adapted), ("source", source_run)):
        result = run_cli("predict", "--run", run, "--data", target, "--split", "val", "--out", work / f"pred_{name}",
                         "--no-progress", "--workers", "0")
        assert result.code == 0, result.err[-3000:]
        outs[name] = read_probs(work / f"pred_{name}" / "predictions.csv")
    _, model, _ = load_run(adapted)
    with torch.no_grad():
        want = torch.softmax(model.eval()(target_images(target, "val"))["logits"], 1).numpy()
    assert np.allclose(outs["adapted"], want, atol=1e-5)
    assert not np.allclose(outs["source"], want, atol=1e-3)


@pytest.fixture(scope="module")
def permuted(work) -> Path:
    return write_target(work / "permuted", splits=(("train", 120), ("val", 30)), permute_labels=True)


def test_target_labels_never_reach_the_statistics(adapted, source_run, permuted, work):
    result = adapt(source_run, permuted, work / "adapted_permuted")
    assert result.code == 0, result.err[-3000:]
    got = torch.load(work / "adapted_permuted" / "model.pt", weights_only=True)
    want = torch.load(adapted / "model.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.fixture(scope="module")
def adapted_coral(work, source_run, target) -> Path:
    result = adapt(source_run, target, work / "adapted_coral", "--head", "coral")
    assert result.code == 0, result.err[-3000:]
    return work / "adapted_coral"


def test_a_head_refit_changes_only_the_classification_layer_and_predict_uses_it(adapted, adapted_coral, target,
                                                                               work):
    got = torch.load(adapted_coral / "model.pt", weights_only=True)
    want = torch.load(adapted / "model.pt", weights_only=True)
    changed = {k for k in got if not torch.equal(got[k], want[k])}
    assert changed == {"heads.classification.linear.weight", "heads.classification.linear.bias"}
    record = json.loads((adapted_coral / "adabn.json").read_text())["head"]
    assert record == {"kind": "coral", "labelled_images": 120}
    result = run_cli("predict", "--run", adapted_coral, "--data", target, "--split", "val", "--out",
                     work / "pred_coral", "--no-progress", "--workers", "0")
    assert result.code == 0, result.err[-3000:]
    _, model, _ = load_run(adapted_coral)
    with torch.no_grad():
        want = torch.softmax(model.eval()(target_images(target, "val"))["logits"], 1).numpy()
    assert np.allclose(read_probs(work / "pred_coral" / "predictions.csv"), want, atol=1e-5)


@pytest.mark.parametrize("head", ["coral", "em"])
def test_target_labels_never_reach_a_head_refit(head, source_run, target, permuted, work):
    for name, data in (("plain", target), ("permuted", permuted)):
        result = adapt(source_run, data, work / f"{head}_{name}", "--head", head)
        assert result.code == 0, result.err[-3000:]
    got = torch.load(work / f"{head}_permuted" / "model.pt", weights_only=True)
    want = torch.load(work / f"{head}_plain" / "model.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in got)
    records = [json.loads((work / f"{head}_{name}" / "adabn.json").read_text())["head"] for name in ("plain",
                                                                                                     "permuted")]
    assert records[0] == records[1] and records[0]["kind"] == head


SELF_TRAIN = ("--head", "coral", "--self-train-rounds", "2", "--self-train-steps", "3", "--batch-size", "16")


def test_self_training_fine_tunes_the_encoder_repeatably_without_target_labels(source_run, target, permuted, work):
    runs = {name: work / f"self_train_{name}" for name in ("plain", "again", "permuted", "none")}
    for name, out in runs.items():
        extra = {"none": SELF_TRAIN[:2] + SELF_TRAIN[-2:], "again": (*SELF_TRAIN, "--num-workers", "2")}.get(
            name, SELF_TRAIN)
        result = adapt(source_run, permuted if name == "permuted" else target, out, *extra)
        assert result.code == 0, result.err[-3000:]
    models = {name: torch.load(out / "model.pt", weights_only=True) for name, out in runs.items()}
    for name in ("again", "permuted"):
        assert all(torch.equal(models[name][k], models["plain"][k]) for k in models["plain"]), name
    encoder = [k for k in models["plain"] if k.startswith("encoder.") and k.endswith("weight")]
    assert encoder and not all(torch.equal(models["plain"][k], models["none"][k]) for k in encoder)
    record = json.loads((runs["plain"] / "adabn.json").read_text())["self_train"]
    assert "skipped" not in record
    rounds = record["rounds"]
    assert [r["kind"] for r in rounds] == ["coral", "coral"] and all(r["pseudo_labelled"] > 0 for r in rounds)
    _, model, _ = load_run(runs["plain"])
    layers = batchnorm_layers(model)
    for name, x in layer_inputs(model, target_images(target)).items():   # the last round's AdaBN: the target's
        assert torch.allclose(layers[name].running_mean.double(), x.mean(1), atol=1e-4), name


def test_self_training_without_a_head_refit_is_taught_by_the_trained_head_repeatably_without_target_labels(
        source_run, target, permuted, work):
    runs = {name: work / f"self_train_source_head_{name}" for name in ("plain", "again", "permuted")}
    for name, out in runs.items():
        extra = ("--num-workers", "2") if name == "again" else ()
        result = adapt(source_run, permuted if name == "permuted" else target, out, "--self-train-rounds", "1",
                       *SELF_TRAIN[-4:], *extra)
        assert result.code == 0, result.err[-3000:]
    record = json.loads((runs["plain"] / "adabn.json").read_text())
    assert record["head"]["kind"] == "source" and record["self_train"]["head"] == "source"
    assert [r["kind"] for r in record["self_train"]["rounds"]] == ["source"]
    assert record["self_train"]["rounds"][0]["pseudo_labelled"] > 0
    models = {name: torch.load(out / "model.pt", weights_only=True) for name, out in runs.items()}
    for name in ("again", "permuted"):
        assert all(torch.equal(models[name][k], models["plain"][k]) for k in models["plain"]), name
    trained = torch.load(source_run / "model.pt", weights_only=True)
    assert not torch.equal(trained["encoder.0.0.weight"], models["plain"]["encoder.0.0.weight"])


def test_an_unknown_head_is_refused_naming_the_kinds(source_run, target, work):
    result = adapt(source_run, target, work / "refused_head", "--head", "nope")
    assert result.code == 2 and "coral" in result.err and "em" in result.err, result.err
    assert not (work / "refused_head").exists()


def test_reader_workers_give_the_statistics_of_no_workers(adapted, source_run, target, work):
    result = adapt(source_run, target, work / "adapted_workers", "--num-workers", "2")
    assert result.code == 0, result.err[-3000:]
    got = torch.load(work / "adapted_workers" / "model.pt", weights_only=True)
    want = torch.load(adapted / "model.pt", weights_only=True)
    assert all(torch.allclose(got[k].double(), want[k].double(), atol=1e-6) for k in got)


def test_a_target_of_another_size_is_refused_naming_both_and_resize_accepts_it(source_run, work):
    small = write_target(work / "small", side=24, splits=(("train", 40),))
    result = adapt(source_run, small, work / "refused_size")
    assert result.code == 2 and all(s in result.err for s in ("[1, 24, 24]", "[1, 32, 32]", "--resize")), result.err
    assert not (work / "refused_size").exists()
    result = adapt(source_run, small, work / "resized", "--resize", "32")
    assert result.code == 0, result.err[-3000:]
    assert "resize: 32" in (work / "resized" / "config.yaml").read_text()


def test_fewer_target_images_than_one_batch_are_refused(source_run, target, work):
    result = adapt(source_run, target, work / "refused_few", "--max-images", "10")
    assert result.code == 2 and "fewer than one batch of 16" in result.err, result.err
    assert not (work / "refused_few").exists()


def test_an_existing_output_is_refused(adapted, source_run, target):
    before = (adapted / "model.pt").read_bytes()
    result = adapt(source_run, target, adapted)
    assert result.code == 2 and "exists" in result.err
    assert (adapted / "model.pt").read_bytes() == before


def test_a_run_without_batchnorm_is_refused(separable_data, target, work, tiny_args):
    run = work / "vit"
    result = run_cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", run, *tiny_args,
                     "--model.encoder.name=vit_tiny", "--model.task_options.classification.standardize=false",
                     "--schedule.epochs=1", "--schedule.batches_per_epoch=1", "--eval.probe_samples=0")
    assert result.code == 0, result.err[-3000:]
    result = adapt(run, target, work / "refused_vit")
    assert result.code == 2 and "no BatchNorm" in result.err and "vit_tiny" in result.err, result.err
    assert not (work / "refused_vit").exists()


def test_stage_adapt_ends_with_adabn_its_head_refit_and_scores_it_on_the_target(cli, separable_data, target,
                                                                                tmp_path, tiny_args):
    run = tmp_path / "run"
    result = cli("train", "--stage", "adapt", "--data", separable_data, "--target-data", target, "--run-dir", run,
                 "--model.tasks=[classification,mmd]", "--data.target.adabn=true", "--data.target.head=coral",
                 "--schedule.epochs=1", "--schedule.batches_per_epoch=4", *tiny_args)
    assert result.code == 0, result.err[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    record = json.loads((run / "adabn" / "adabn.json").read_text())
    assert record["source_run"] == str(run.resolve()) and record["images"] == 120
    assert record["head"]["kind"] == "coral"
    result = cli("eval", "--run-dir", run / "adabn")   # its own data: the target
    assert result.code == 0, result.err[-3000:]
    evaluated = json.loads((run / "adabn" / "metrics.json").read_text())
    for key in ("accuracy", "auc_macro"):
        assert metrics[f"adabn/target/val/{key}"] == evaluated[f"val/{key}"], key
    assert (run / "scores_adabn_target_val.npz").is_file()


def test_stage_adapt_with_adabn_refuses_a_model_without_batchnorm_before_writing(cli, separable_data, target,
                                                                                  tmp_path, tiny_args):
    run = tmp_path / "run"
    result = cli("train", "--stage", "adapt", "--data", separable_data, "--target-data", target, "--run-dir", run,
                 *tiny_args, "--model.tasks=[classification,mmd]", "--data.target.adabn=true",
                 "--model.encoder.name=vit_tiny", "--model.task_options.classification.standardize=false")
    assert result.code == 2 and "data.target.adabn" in result.err and "no BatchNorm" in result.err, result.err
    assert not run.exists()


@pytest.mark.parametrize("extra, message", [
    (["--data.target.head=coral", "--data.target.adabn=false"], "needs data.target.adabn=true"),
    (["--data.target.head=nope"], "data.target.head='nope': expected one of source, coral, em")])
def test_stage_adapt_refuses_a_head_refit_it_cannot_do_before_writing(cli, separable_data, target, tmp_path,
                                                                      tiny_args, extra, message):
    run = tmp_path / "run"
    result = cli("train", "--stage", "adapt", "--data", separable_data, "--target-data", target, "--run-dir", run,
                 *tiny_args, "--model.tasks=[classification,mmd]", *extra)
    assert result.code == 2 and message in result.err, result.err
    assert not run.exists()
