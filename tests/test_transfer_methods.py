"""Transfer methods beyond fine-tuning: the layer groups of every shipped backbone, layer-wise learning-rate decay and
frozen stages in the optimiser, LP-FT's head starting as the linear probe, and each method's run (the semi-supervised
multi-task's with its unlabelled stream) resuming to the same parameters as an uninterrupted one (the 2-rank studies
of tests/test_transfer.py and tests/test_transfer_multitask.py train them on 2 ranks)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dlscale.cli import main
from dlscale.train import checkpoint
from runs import own_logging

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"


def _model_and_config(encoder: str = "small", **optim):
    from dlscale.train.config import load_config
    from dlscale.train.model import build_model
    cfg = load_config(None, [f"optim.{k}={v}" for k, v in optim.items()] + [f"model.encoder.name={encoder}",
                                                                             "model.encoder.width=8"],
                      stage="supervised")
    torch.manual_seed(0)
    return build_model("supervised", cfg.model.encoder, (1, 16, 16)), cfg


def test_layer_decay_gives_each_parameter_group_the_learning_rate_its_depth_implies():
    from dlscale.models import layer_groups
    from dlscale.train.deepspeed_setup import make_optimizer
    model, cfg = _model_and_config(lr=1e-2, layer_decay=0.5, encoder_lr_scale=0.4, weight_decay=0.0)
    optimizer = make_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    groups = layer_groups(model)
    for i, group in enumerate(groups):
        depth = len(groups) - i                     # the last stage is 1 from the output, the stem len(groups)
        for name in group:
            assert lr_of[id(named[name])] == pytest.approx(1e-2 * 0.4 * 0.5 ** depth)
    heads = [p for n, p in named.items() if n.startswith("heads.")]
    assert heads and all(lr_of[id(p)] == pytest.approx(1e-2) for p in heads)
    # and Adam's first step moves each parameter by about its group's learning rate
    before = {n: p.detach().clone() for n, p in named.items()}
    model.train()
    torch.nn.functional.cross_entropy(model(torch.rand(8, 1, 16, 16))["logits"], torch.arange(8) % 3).backward()
    optimizer.step()
    for name, p in named.items():
        moved = (p.detach() - before[name]).abs().max().item()
        assert 0.5 * lr_of[id(p)] < moved <= 1.01 * lr_of[id(p)], name


def test_frozen_stages_get_no_gradient_and_stay_unchanged_while_the_rest_trains():
    from dlscale.train.deepspeed_setup import make_optimizer
    model, cfg = _model_and_config(freeze_stages=2)
    optimizer = make_optimizer(model, cfg)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("encoder.0.", "encoder.1.")) for n in frozen)
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in optimised for n, p in model.named_parameters() if n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    torch.nn.functional.cross_entropy(model(torch.rand(8, 1, 16, 16))["logits"], torch.arange(8) % 3).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not changed & set(frozen) and "encoder.2.0.weight" in changed
    model, cfg = _model_and_config(freeze_stages=4)
    with pytest.raises(ValueError, match="optim.freeze_stages=4: encoder small has 3 layer groups"):
        make_optimizer(model, cfg)


@pytest.mark.parametrize(("override", "expected"), [("optim.layer_decay=0", "optim.layer_decay=0"),
                                                    ("optim.freeze_stages=-1", "optim.freeze_stages=-1")])
def test_bad_layer_options_are_refused_naming_the_key(override, expected):
    from dlscale.train.config import load_config
    with pytest.raises(ValueError, match=expected):
        load_config(None, [override], stage="supervised", data_dir="d", run_dir="r")


# ---- runs through the engine, in this process ---------------------------------------------------------------------

def train(*argv) -> Path:
    with own_logging():
        assert main(["train", *map(str, argv)]) == 0
    return Path(argv[argv.index("--run-dir") + 1])


@pytest.fixture(scope="module")
def pretrained(separable_data, tiny_args, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("methods") / "encoder"
    return train("--stage", "supervised", "--data", separable_data, "--run-dir", run, *tiny_args,
                 "--schedule.epochs=1", "--schedule.batches_per_epoch=3")


def test_lpft_head_starts_as_the_linear_probe_on_the_encoder_s_frozen_features(pretrained, separable_data,
                                                                                 tiny_args, tmp_path):
    """At learning rate 0 the engine never moves the head, so model.pt holds the head it started from."""
    from dlscale.data.stream_config import StreamConfig
    from dlscale.export import load_encoder
    from dlscale.metrics import logistic_probe
    from dlscale.train.config import load_config
    from dlscale.transfer.features import features
    from dlscale.transfer.training import stream_fields
    run = train("--stage", "supervised", "--data", separable_data, "--run-dir", tmp_path / "lpft", *tiny_args,
                "--init-from", pretrained / "encoder.pt", "--optim.lr=0", "--schedule.epochs=1",
                "--schedule.batches_per_epoch=2", "--eval.probe_samples=1000",
                "--model.task_options.classification.probe_init=true",
                "--model.task_options.classification.refit_head=false")
    assert "heads fitted before training on 240 images" in (run / "log.txt").read_text()
    cfg = load_config(run / "config.yaml")
    train_set = features(load_encoder(pretrained / "encoder.pt"), separable_data,
                         StreamConfig(**stream_fields(cfg.data)), "train", "pretrained")
    x, y = train_set["features"].astype(np.float64), train_set["labels"]
    state = torch.load(run / "model.pt", weights_only=True)
    weight, bias = (state[f"heads.classification.linear.{k}"].double().numpy() for k in ("weight", "bias"))
    z = (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + 1e-5)     # the head's standardisation, fitted at the start
    logits = z @ weight.T + bias
    head = np.exp(logits - logits.max(1, keepdims=True))
    head /= head.sum(1, keepdims=True)
    probe = logistic_probe(0).fit(x, y).predict_proba(x)
    assert np.abs(head - probe).max() < 2e-3
    assert (head.argmax(1) == probe.argmax(1)).all()


REGRESSION = ["--stage", "multitask", "--model.tasks=[regression]", "--data.targets=[theta_E]"]


def test_lpft_regression_head_starts_as_the_ridge_probe_on_the_encoder_s_frozen_features(pretrained, separable_data,
                                                                                         tiny_args, tmp_path):
    """A regression-only run has no classification probe (`eval.probe_samples=0`): its head starts as the ridge
    probe of the whole train split, in the targets' units once the run's target standardisation is undone."""
    from dlscale.data.stream import StreamConfig
    from dlscale.export import load_encoder, read_encoder_file
    from dlscale.train.config import load_config
    from dlscale.transfer.features import features
    from dlscale.transfer.scoring import probe_regressor
    from dlscale.transfer.training import stream_fields
    run = train(*REGRESSION, "--data", separable_data, "--run-dir", tmp_path / "lpft", *tiny_args,
                "--init-from", pretrained / "encoder.pt", "--optim.lr=0", "--schedule.epochs=1",
                "--schedule.batches_per_epoch=2", "--eval.probe_samples=0",
                "--model.task_options.regression.probe_init=true",
                "--model.task_options.regression.refit_head=false")   # the head as it started, not refitted at the end
    assert "heads fitted before training on 240 images" in (run / "log.txt").read_text()
    cfg = load_config(run / "config.yaml")
    stream = StreamConfig(**stream_fields(cfg.data))
    encoder = load_encoder(pretrained / "encoder.pt")
    train_set, val_set = (features(encoder, separable_data, stream, split, "pretrained") for split in ("train", "val"))
    stats = read_encoder_file(run / "encoder.pt")["target_stats"]
    state = torch.load(run / "model.pt", weights_only=True)
    weight, bias = (state[f"heads.regression.linear.{k}"].double().numpy() for k in ("weight", "bias"))
    head = (val_set["features"] @ weight.T + bias) * stats["std"] + stats["mean"]
    probe = probe_regressor(train_set["features"], train_set["target"], val_set["features"])
    assert np.abs(head - probe).max() < 1e-4 * np.ptp(val_set["target"])
    assert np.abs(probe - val_set["target"]).mean() < 0.5 * np.abs(val_set["target"] - stats["mean"]).mean()


VIT = ["--model.encoder.name=vit_tiny"]
LORA = ["--model.lora.rank=4"]


@pytest.fixture(scope="module")
def vit_pretrained(separable_data, tiny_args, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("methods") / "vit"
    return train("--stage", "supervised", "--data", separable_data, "--run-dir", run, *tiny_args, *VIT,
                 "--schedule.epochs=1", "--schedule.batches_per_epoch=2")


TRAIN_DATA = object()   # stands for the training data's directory (the unlabelled stream of method multitask)
METHOD_OPTIONS = {   # method -> (its training options, the pretrained encoder's fixture)
    "lpft": (["--model.task_options.classification.probe_init=true"], "pretrained"),
    "lpft_regression": ([*REGRESSION, "--eval.probe_samples=0", "--model.task_options.regression.probe_init=true"],
                        "pretrained"),
    "layer_decay": (["--optim.layer_decay=0.5"], "pretrained"),
    "partial": (["--optim.freeze_stages=1"], "pretrained"),
    "lora": ([*VIT, *LORA], "vit_pretrained"),
    "multitask": (["--stage", "multitask", "--model.tasks=[classification,recon_unlabelled]",
                   "--loss.fixed.weights={classification: 1.0, recon_unlabelled: 1000.0}", "--target-data",
                   TRAIN_DATA, "--data.target.evaluate=false"], "pretrained"),
    "multitask_contrastive": (["--stage", "multitask",
                               "--model.tasks=[classification,recon_unlabelled,contrastive_unlabelled]",
                               "--loss.fixed.weights={classification: 1.0, recon_unlabelled: 100.0, "
                               "contrastive_unlabelled: 1.0}", "--target-data", TRAIN_DATA,
                               "--data.target.evaluate=false"], "pretrained"),
}


@pytest.mark.slow   # two runs per method
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_each_method_s_run_resumes_to_the_same_parameters_as_an_uninterrupted_one(method, request,
                                                                                  separable_data, tiny_args,
                                                                                  tmp_path):
    options, encoder = METHOD_OPTIONS[method]
    options = [separable_data if option is TRAIN_DATA else option for option in options]
    pretrained = request.getfixturevalue(encoder)
    argv = ["--stage", "supervised", "--data", separable_data, *tiny_args, "--init-from", pretrained / "encoder.pt",
            "--schedule.epochs=2", "--schedule.batches_per_epoch=5", "--schedule.checkpoint_every=3",
            "--schedule.keep_checkpoints=10", *options]
    whole = train(*argv, "--run-dir", tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("model.pt", "encoder.pt", "metrics.json", "log.txt"):
        (cut / name).unlink()
    shutil.rmtree(cut / "tb")
    tag = checkpoint.tag_for(3)
    for later in (cut / "checkpoints").glob("step*"):
        if later.name > tag:
            shutil.rmtree(later)
    (cut / "checkpoints" / "latest").write_text(tag)
    train(*argv, "--run-dir", cut, "--resume", "auto")
    assert f"resumed from {tag}" in (cut / "log.txt").read_text()
    resumed, uninterrupted = (torch.load(d / "model.pt", weights_only=True) for d in (cut, whole))
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k, v in resumed.items() if torch.is_tensor(v) and not torch.equal(v, uninterrupted[k])] == []
    recorded = yaml.safe_load((whole / "config.yaml").read_text())
    assert json.loads((whole / "metrics.json").read_text())["step"] == 10
    assert recorded["optim"]["layer_decay"] == (0.5 if method == "layer_decay" else 1.0)


# ---- LoRA on 2 ranks ----------------------------------------------------------------------------------------------

@pytest.mark.slow   # torchrun
def test_lora_trains_on_two_ranks_and_leaves_the_frozen_weights_bitwise_unchanged(vit_pretrained, separable_data,
                                                                                  tiny_args, launch, venv_bin,
                                                                                  tmp_path):
    run = tmp_path / "lora"
    launched = launch([venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", TRAIN_SCRIPT, "--stage",
                       "supervised", "--data", separable_data, "--run-dir", run, *tiny_args, *VIT, *LORA,
                       "--init-from", vit_pretrained / "encoder.pt", "--schedule.epochs=1",
                       "--schedule.batches_per_epoch=4"], tmp_path / "lora.log", tmp_path)
    assert launched.wait(420) == 0, launched.output()[-4000:]
    assert "2 rank(s)" in (run / "log.txt").read_text()
    pretrained = torch.load(vit_pretrained / "encoder.pt", weights_only=True)["state_dict"]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    trained = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    adapted = {k for k in trained if ".lora_" in k}
    assert adapted and any(trained[k].abs().max() > 0 for k in adapted if ".lora_B." in k)   # the adapters trained
    for name, weight in pretrained.items():
        key = f"encoder.{name}"
        if key not in trained:   # a layer with adapters keeps its own weight as base_layer
            key = f"encoder.{name.rpartition('.')[0]}.base_layer.{name.rpartition('.')[2]}"
        assert torch.equal(trained[key], weight), name
    exported = torch.load(run / "model.pt", weights_only=True)   # the adapters merged under the plain names
    assert not any(".lora_" in k or "base_layer" in k for k in exported)
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(exported[f"encoder.{qkv}"], pretrained[qkv])
    assert torch.equal(exported["encoder.pos_embed"], pretrained["pos_embed"])


# ---- the methods in a study ---------------------------------------------------------------------------------------

def transfer(*argv):
    with own_logging():
        return main(["transfer", *map(str, argv)])


def test_lora_on_an_encoder_without_attention_is_refused_before_any_training(pretrained, separable_data, tmp_path,
                                                                             capsys):
    code = transfer("--encoder", pretrained, "--data", separable_data, "--out", tmp_path / "out", "--methods",
                    "probe,lora", "--labels-per-class", "2", "--repeats", "1", "--ranks", "1")
    assert code != 0 and "methods lora: encoder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.slow   # a study of LoRA runs
def test_a_lora_study_trains_adapters_of_the_budget_s_rank_and_records_the_method(vit_pretrained, separable_data,
                                                                                  tmp_path):
    out = tmp_path / "study"
    assert transfer("--encoder", vit_pretrained, "--data", separable_data, "--out", out, "--methods", "lora",
                    "--tasks", "classification", "--labels-per-class", "2", "--repeats", "1", "--ranks", "1",
                    "--budget.lora_rank=2", "--epochs=1", "--n-bootstrap=20", "--budget.min_batches_per_epoch=2",
                    "--data.num_workers=0", "--data.batch_size=8", "--data.shuffle_buffer=32") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["lora"] and results["config"]["budget"]["lora_rank"] == 2
    (cell,) = results["cells"]
    assert cell["method"] == "lora" and "auc_macro" in cell["mean"]
    config = yaml.safe_load((Path(cell["runs"][0]) / "config.yaml").read_text())
    assert config["model"]["lora"]["rank"] == 2 and config["init_from"] == str(vit_pretrained / "encoder.pt")
    assert "lora:" in (out / "report.md").read_text()
