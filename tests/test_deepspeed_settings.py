"""One source of truth for the DeepSpeed settings: a `deepspeed.config_file` that disagrees with the YAML decides
the precision, ZeRO stage and gradient accumulation, and the learning-rate schedule, the checkpoints' step count,
the logs and config.yaml all follow it."""
import json

import pytest
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
