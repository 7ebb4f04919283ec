"""One source of truth for the DeepSpeed settings: a `deepspeed.config_file` that disagrees with the YAML decides
the precision, ZeRO stage and gradient accumulation, and the learning-rate schedule, the checkpoints' step count,
the logs and config.yaml all follow it."""
import json

import pytest
import torch
import yaml



def test_a_ds_config_file_that_disagrees_with_the_yaml_is_what_every_part_uses(separable_data, tiny_args, tmp_path,
                                                                            cli):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
                                   "gradient_clipping": 1.0}))
    run = tmp_path / "run"
    result = cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", run, *tiny_args,
                 "--schedule.epochs=1", "--schedule.batches_per_epoch=6", "--schedule.log_every=1",
                 "--deepspeed.grad_accum=1", "--deepspeed.zero_stage=1", f"--deepspeed.config_file={ds_json}",
                 "--optim.warmup_steps=1")
    assert result.code == 0, result.err[-3000:]
    recorded = yaml.safe_load((run / "config.yaml").read_text())["deepspeed"]
    assert (recorded["grad_accum"], recorded["zero_stage"], recorded["precision"]) == (2, 2, "fp32")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 3                       # 6 micro-batches / 2 accumulated per optimizer step
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert "sets deepspeed.grad_accum=2 (the config said 1)" in result.err
    assert "sets deepspeed.zero_stage=2 (the config said 1)" in result.err
    logged = [int(line.split(" step ")[1].split()[0]) for line in (run / "log.txt").read_text().splitlines()
              if " step " in line and " epoch " in line and "loss" in line]
    assert logged == [1, 2, 3]                     # one log line per optimizer step, after it, never mid-accumulation


@pytest.mark.parametrize(("content", "expected"), [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported on CPU"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0"),
])
def test_a_ds_config_file_dlscale_cannot_run_is_refused_before_the_run_directory(separable_data, tiny_args,
                                                                                 tmp_path, content, expected, cli):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps(content))
    result = cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", tmp_path / "run",
                 *tiny_args, f"--deepspeed.config_file={ds_json}")
    assert result.code == 2 and expected in result.err and str(ds_json) in result.err
    assert not (tmp_path / "run").exists()


def _supervised_model_and_config(**optim):
    from dlscale.train.config import load_config
    from dlscale.models import EncoderConfig
    from dlscale.train.model import build_model
    cfg = load_config(None, [f"optim.{k}={v}" for k, v in optim.items()], stage="supervised")
    torch.manual_seed(0)
    model = build_model("supervised", EncoderConfig(name="small", width=8), (1, 16, 16))
    return model, cfg


def test_encoder_lr_scale_moves_the_encoder_at_that_multiple_of_the_heads_learning_rate():
    from dlscale.train.deepspeed_setup import make_optimizer
    model, cfg = _supervised_model_and_config(lr=1e-2, encoder_lr_scale=0.01, weight_decay=0.0)
    optimizer = make_optimizer(model, cfg)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-2])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.rand(8, 1, 16, 16)
    model.train()
    torch.nn.functional.cross_entropy(model(x)["logits"], torch.arange(8) % 3).backward()
    optimizer.step()
    # Adam's first step moves a parameter with a gradient by about lr in each coordinate
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    encoder = max(v for k, v in moved.items() if k.startswith("encoder."))
    heads = max(v for k, v in moved.items() if k.startswith("heads."))
    assert 0.5e-4 < encoder <= 1.01e-4 and 0.5e-2 < heads <= 1.01e-2
    one_group, cfg = _supervised_model_and_config(lr=1e-2)
    assert len(make_optimizer(one_group, cfg).param_groups) == 1   # the default keeps checkpoints' single group


def test_a_non_positive_encoder_lr_scale_is_refused_before_the_run_directory(separable_data, tiny_args, tmp_path,
                                                                            cli):
    run = tmp_path / "run"
    result = cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", run, *tiny_args,
                 "--optim.encoder_lr_scale=0")
    assert result.code != 0 and "optim.encoder_lr_scale=0" in result.err and not run.exists()
