"""Every command's config: `--print-config` prints YAML with each key's meaning that the same command reads back
with `--config` to the identical config (printed -> loaded -> printed again, unchanged)."""
from __future__ import annotations

def test_transfer_print_config_round_trips(cli, tmp_path):
    first = cli("transfer", "--print-config", "--labels-per-class", "10,all", "--epochs", "3",
                    "--data.batch_size=16", "--task_options.superres.steps=7")
    assert first.code == 0, first.err
    assert "# runs from a pretrained encoder (every trained method but scratch): its learning rate" in first.out
    assert "labels_per_class: [10, all]" in first.out and "batch_size: 16" in first.out
    path = tmp_path / "transfer.yaml"
    path.write_text(first.out)
    again = cli("transfer", "--print-config", "--config", path)
    assert again.code == 0, again.err
    assert again.out == first.out


def test_transfer_config_refuses_a_misspelt_key_naming_it(cli):
    result = cli("transfer", "--print-config", "--budget.epoch=3")
    assert result.code == 2 and "budget.epoch" in result.err
    result = cli("transfer", "--print-config", "--task_options.superres.stepz=3")
    assert result.code == 2 and "task_options.superres.stepz" in result.err
    result = cli("transfer", "--print-config", "--data.normalize=log")
    assert result.code == 2 and "normalize=NAME" in result.err


def test_transfer_refuses_to_run_without_its_inputs(cli, tmp_path):
    result = cli("transfer", "--out", tmp_path / "t")
    assert result.code == 2 and "--encoder" in result.err and not (tmp_path / "t").exists()


def test_tune_print_config_round_trips_and_keeps_the_order_of_mappings(cli, tmp_path):
    first = cli("tune", "--print-config", "--data", tmp_path, "--trials", "5", "--optim.lr=0.002")
    assert first.code == 0, first.err
    assert "pareto: {val/recon_mse: min, val/auc_macro: max}" in first.out   # x axis first, as the file says
    assert "trials: 5" in first.out and "lr: 0.002" in first.out and "# ASHA keeps the best" in first.out
    path = tmp_path / "sweep.yaml"
    path.write_text(first.out)
    again = cli("tune", "--print-config", "--config", path)
    assert again.code == 0, again.err
    assert again.out == first.out


def test_predict_print_config_round_trips_and_its_flags_set_its_keys(cli, tmp_path):
    first = cli("predict", "--print-config", "--run", "runs/x", "--batch-size", "8", "--workers", "0", "--embeddings",
                "--no-progress")
    assert first.code == 0, first.err
    for line in ("model: runs/x", "batch_size: 8", "num_workers: 0", "embeddings: true", "progress: false"):
        assert line in first.out
    path = tmp_path / "predict.yaml"
    path.write_text(first.out)
    again = cli("predict", "--print-config", "--config", path)
    assert again.code == 0, again.err
    assert again.out == first.out
    bad = cli("predict", "--print-config", "--device=tpu")
    assert bad.code == 2 and "device='tpu'" in bad.err
    missing = cli("predict", "--out", tmp_path / "o")
    assert missing.code == 2 and "--run" in missing.err and not (tmp_path / "o").exists()
