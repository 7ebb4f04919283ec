"""`data.transforms=device`: the stream hands over raw records and `finish_batch` resizes, normalises and augments
on the training device; evaluation batches come out exactly as on the host, training batches are reproducible."""
from dataclasses import replace

import torch

from dlscale.data.stream import eval_loader, train_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import finish_batch


def test_eval_batches_transformed_on_the_device_equal_the_host_ones(separable_data):
    host = StreamConfig(batch_size=16, num_workers=0, normalize="standardize", resize=24)
    device = replace(host, transforms="device")
    for a, b in zip(eval_loader(separable_data, host), eval_loader(separable_data, device), strict=True):
        assert "raw" in b and b["image"].shape[-1] == 32   # the record as stored
        finished = finish_batch(b, device, torch.device("cpu"))
        assert "raw" not in finished and torch.allclose(finished["image"], a["image"], atol=1e-6)
        assert torch.equal(finished["label"], a["label"]) and torch.equal(finished["ids"], a["ids"])


def test_training_batches_augmented_on_the_device_are_reproducible_and_augmented(separable_data):
    cfg = StreamConfig(batch_size=16, num_workers=0, shuffle_buffer=64, transforms="device")
    first = [finish_batch(b, cfg, torch.device("cpu")) for b in train_loader(separable_data, cfg, batches=3)]
    again = [finish_batch(b, cfg, torch.device("cpu")) for b in train_loader(separable_data, cfg, batches=3)]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    plain = replace(cfg, augment=False)
    unaugmented = [finish_batch(b, plain, torch.device("cpu")) for b in train_loader(separable_data, plain, batches=3)]
    assert any(not torch.equal(a["image"], u["image"]) for a, u in zip(first, unaugmented))
    assert all(torch.equal(a["ids"], u["ids"]) for a, u in zip(first, unaugmented))   # same samples, same order
    sums = [torch.sort(a["image"].flatten(1).sum(1)).values for a in first]
    sums_plain = [torch.sort(u["image"].flatten(1).sum(1)).values for u in unaugmented]
    assert all(torch.allclose(s, p, atol=1e-4) for s, p in zip(sums, sums_plain))   # dihedral: pixels permuted


def test_a_run_trains_with_transforms_on_the_device(cli, tmp_path, separable_data, tiny_args):
    result = cli("train", "--stage", "supervised", "--data", separable_data, "--run-dir", tmp_path / "run",
                 *tiny_args, "--schedule.epochs=1", "--data.transforms=device")
    assert result.code == 0, result.err[-3000:]
    assert "transforms: device" in (tmp_path / "run" / "config.yaml").read_text()
