"""Semi-supervised multi-task transfer (methods multitask, multitask_scratch): classification learns from the label
subset only, the `recon_unlabelled` task rebuilds every image of the train split (the unlabelled stream
`data.target`) and `contrastive_unlabelled` compares two views of each, whose labels reach no loss; the study trains
both methods on 2 ranks and records them."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dlscale.cli import main
from dlscale.data.classes import CLASSES
from dlscale.data.shards import DatasetWriter
from dlscale.models.model import TARGET_DOMAIN
from dlscale.train.tasks.supervised import Classification
from dlscale.train.tasks import contrastive
from dlscale.train.tasks.unlabelled import UnlabelledContrastive, UnlabelledReconstruction
from dlscale.transfer.config import check_unlabelled_tasks
from dlscale.transfer.subsets import train_index, write_subset
from runs import own_logging

TASKS = ["--stage", "multitask", "--model.tasks=[classification,recon_unlabelled]",
         "--loss.fixed.weights={classification: 1.0, recon_unlabelled: 1000.0}"]
STUDY = ["--data.num_workers=0", "--data.batch_size=8", "--data.shuffle_buffer=32", "--epochs=1",
         "--n-bootstrap=20", "--budget.min_batches_per_epoch=2"]


def cli(command: str, *argv) -> int:
    with own_logging():
        return main([command, *map(str, argv)])


def copy_with_labels(records, data: Path, out: Path, permute: bool) -> Path:
    """`data` rewritten sample by sample in the same layout (so the same ids), the train labels permuted or not."""
    train, val = records(data, "train"), records(data, "val")
    labels = [s.label for s in train]
    if permute:
        labels = list(np.random.default_rng(5).permutation(labels))
    shape = train[0].image.shape
    with DatasetWriter(out, shape, {"kind": "test"}, shard_size=50, samples_per_record=8) as writer:
        for split, samples, split_labels in (("train", train, labels), ("val", val, [s.label for s in val])):
            for sample, label in zip(samples, split_labels):
                writer.add(split, sample.image, int(label), {**sample.meta, "class": CLASSES[label]})
    return out


@pytest.fixture(scope="module")
def unlabelled_sets(separable_data, records, tmp_path_factory):
    """The train split as the unlabelled stream, with its true and with permuted labels, and a label subset of it
    (4 per class)."""
    root = tmp_path_factory.mktemp("unlabelled")
    true, permuted = (copy_with_labels(records, separable_data, root / name, name == "permuted")
                      for name in ("true", "permuted"))
    assert [s.label for s in records(true, "train")] != [s.label for s in records(permuted, "train")]
    ids, labels = train_index(true)
    chosen = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(len(CLASSES))])
    subset = write_subset(true, ids[chosen], root / "subset", "val", {"n_per_class": 4})
    return subset, true, permuted


def test_reconstruction_sees_every_train_image_and_classification_only_the_subset_s_labels(
        unlabelled_sets, tiny_args, records, monkeypatch, tmp_path):
    subset, true, permuted = unlabelled_sets
    seen = {"unlabelled": [], "labelled": []}
    recon_loss, class_loss = UnlabelledReconstruction.loss, Classification.loss

    def spy_recon(self, out, images, batch):
        seen["unlabelled"] += [tuple(i) for i in batch[TARGET_DOMAIN]["ids"].tolist()]
        assert set(batch[TARGET_DOMAIN]) <= {"image", "ids"}           # no labels in the unlabelled stream
        return recon_loss(self, out, images, batch)

    def spy_class(self, out, images, batch):
        seen["labelled"] += [tuple(i) for i in batch["ids"].tolist()]
        return class_loss(self, out, images, batch)

    monkeypatch.setattr(UnlabelledReconstruction, "loss", spy_recon)
    monkeypatch.setattr(Classification, "loss", spy_class)
    argv = [*TASKS, "--data", subset, *tiny_args, "--schedule.epochs=2", "--schedule.batches_per_epoch=15",
            "--eval.probe_samples=12", "--data.target.evaluate=false"]
    for name, target in (("true", true), ("permuted", permuted)):
        assert cli("train", *argv, "--target-data", target, "--run-dir", tmp_path / name) == 0
        if name == "true":
            unlabelled, labelled = set(seen["unlabelled"]), set(seen["labelled"])
    train_ids = {s.id for s in records(true, "train")}
    assert len(seen["unlabelled"]) == 2 * 2 * 15 * 16                  # 16 unlabelled images a step, both runs
    assert unlabelled <= train_ids and len(unlabelled) > len(train_ids) / 2   # resampled shards: not all, most
    assert labelled == {s.id for s in records(subset, "train")} and len(labelled) == 12
    models = [torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("true", "permuted")]
    assert [k for k, v in models[0].items() if torch.is_tensor(v) and not torch.equal(v, models[1][k])] == []
    metrics = json.loads((tmp_path / "true" / "metrics.json").read_text())
    assert metrics["val/recon_mse"] > 0 and metrics["train/weight_recon_unlabelled"] == 1000.0


def test_contrastive_views_are_drawn_from_the_unlabelled_images_whose_labels_reach_no_loss(
        unlabelled_sets, tiny_args, monkeypatch, tmp_path):
    subset, true, permuted = unlabelled_sets
    unlabelled, drawn = {}, []
    forward, two_views = UnlabelledContrastive.forward, contrastive.two_views

    def spy_forward(self, head, feature_map, images, batch, model):
        if batch is not None:
            unlabelled["images"], unlabelled["labelled"] = batch[TARGET_DOMAIN]["image"], images
        return forward(self, head, feature_map, images, batch, model)

    def spy_views(images, *args):
        drawn.append(images is unlabelled["images"] and images is not unlabelled["labelled"])
        return two_views(images, *args)

    monkeypatch.setattr(UnlabelledContrastive, "forward", spy_forward)
    monkeypatch.setattr(contrastive, "two_views", spy_views)
    argv = ["--stage", "multitask", "--model.tasks=[classification,contrastive_unlabelled]",
            "--loss.fixed.weights={classification: 1.0, contrastive_unlabelled: 0.5}", "--data", subset, *tiny_args,
            "--schedule.epochs=1", "--schedule.batches_per_epoch=6", "--eval.probe_samples=12",
            "--data.target.evaluate=false"]
    for name, target in (("true", true), ("permuted", permuted)):
        assert cli("train", *argv, "--target-data", target, "--run-dir", tmp_path / name) == 0
    assert drawn == [True] * 2 * 6
    models = [torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("true", "permuted")]
    assert [k for k, v in models[0].items() if torch.is_tensor(v) and not torch.equal(v, models[1][k])] == []
    assert any(k.startswith("heads.contrastive_unlabelled.projector") for k in models[0])
    metrics = json.loads((tmp_path / "true" / "metrics.json").read_text())
    assert metrics["train/weight_contrastive_unlabelled"] == 0.5


@pytest.mark.parametrize("tasks, expected", [
    ("{recon_unlabelled: 0.0}", "budget.unlabelled_tasks.recon_unlabelled=0.0: expected a loss weight > 0"),
    ("{contrastive_unlabelled: -1.0}", "budget.unlabelled_tasks.contrastive_unlabelled=-1.0: expected a loss weight"),
    ("{classification: 1.0}", "budget.unlabelled_tasks.classification: not a task that learns from the unlabelled"),
    ("[recon_unlabelled]", "config key 'budget.unlabelled_tasks': expected dict"),
])
def test_bad_unlabelled_tasks_are_refused_naming_the_entry_before_anything_is_written(tasks, expected,
                                                                                     pretrained_encoder,
                                                                                     separable_data, tmp_path,
                                                                                     capsys):
    out = tmp_path / "study"
    code = cli("transfer", "--encoder", pretrained_encoder, "--data", separable_data, "--out", out, "--methods",
               "multitask", "--labels-per-class", "2", "--repeats", "1", "--ranks", "1",
               f"--budget.unlabelled_tasks={tasks}")
    assert code != 0 and expected in capsys.readouterr().err
    assert not out.exists()


def test_an_empty_set_of_unlabelled_tasks_is_refused():   # a config file's `{}` merges into the default
    with pytest.raises(ValueError, match="budget.unlabelled_tasks is empty: expected at least one task"):
        check_unlabelled_tasks({})


def test_the_unlabelled_reconstruction_without_an_unlabelled_stream_is_refused_naming_it(separable_data,
                                                                                        tiny_args, tmp_path,
                                                                                        capsys):
    code = cli("train", *TASKS, "--data", separable_data, *tiny_args, "--run-dir", tmp_path / "run")
    err = capsys.readouterr().err
    assert code != 0 and "recon_unlabelled" in err and "read the unlabelled images of data.target" in err
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.fixture(scope="module")
def pretrained_encoder(separable_data, tiny_args, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("multitask") / "encoder"
    assert cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", run, *tiny_args,
               "--schedule.epochs=1", "--schedule.batches_per_epoch=3") == 0
    return run


@pytest.mark.slow   # the 2-rank study (torchrun)
@pytest.mark.parametrize("unlabelled", [{"recon_unlabelled": 500.0},
                                        {"recon_unlabelled": 500.0, "contrastive_unlabelled": 0.5, "selftrain": 2.0}])
def test_a_two_rank_study_trains_both_multitask_methods_on_the_fine_tune_budget_and_records_them(
        unlabelled, pretrained_encoder, separable_data, tmp_path):
    out = tmp_path / "study"
    assert cli("transfer", "--encoder", pretrained_encoder, "--data", separable_data, "--out", out, "--methods",
               "finetune,multitask,multitask_scratch", "--tasks", "classification", "--labels-per-class", "2",
               "--repeats", "1", "--ranks", "2", f"--budget.unlabelled_tasks={json.dumps(unlabelled)}", *STUDY) == 0
    results = json.loads((out / "results.json").read_text())
    cells = {c["method"]: c for c in results["cells"]}
    assert set(cells) == {"finetune", "multitask", "multitask_scratch"}
    assert results["config"]["budget"]["unlabelled_tasks"] == unlabelled
    assert "n_unlabelled" not in cells["finetune"]
    runs = {m: Path(c["runs"][0]) for m, c in cells.items()}
    for method in ("multitask", "multitask_scratch"):
        assert cells[method]["n_unlabelled"] == 240 and cells[method]["n_train"] == 6
        config = yaml.safe_load((runs[method] / "config.yaml").read_text())
        assert config["stage"] == "multitask" and config["model"]["tasks"] == ["classification", *unlabelled]
        assert config["data"]["target"]["data_dir"] == str(separable_data)
        assert config["loss"]["fixed"]["weights"] == {"classification": 1.0, **unlabelled}
        log = (runs[method] / "log.txt").read_text()
        assert "2 rank(s)" in log
        assert ("encoder initialised from" in log) == (method == "multitask")
        metrics = json.loads((runs[method] / "metrics.json").read_text())
        assert metrics["step"] == json.loads((runs["finetune"] / "metrics.json").read_text())["step"] == 2
        assert metrics["refit/samples"] == 6                    # the head refitted to the subset's images only
    assert "multitask_scratch:" in (out / "report.md").read_text()
