"""Training straight from the simulator: determinism, ranks/workers/epochs, class balance, targets, the eval set."""
import json
import math
import os

import pytest
import torch

from dlscale.configtree import flatten, from_dict
from dlscale.data.classes import CLASSES
from dlscale.data.shards import load_manifest
from dlscale.data.stream import eval_loader, make_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import normalize, resize
from dlscale.sim.stream import (SimulationSourceConfig, SimulationStream, prepare_eval_set, simulation_device,
                                simulation_loader)

TINY = {"instrument.n_pix": 16, "lens.randomize": True}


def source(**overrides):
    return SimulationSourceConfig(preset="model_ii", overrides={**TINY, **overrides.pop("sim", {})}, **overrides)


def stream(batch_size=8, batches=3, seed=0, rank=0, world=1, workers=0, src=None, **cfg):
    cfg = StreamConfig(batch_size=batch_size, num_workers=workers, **cfg)
    return SimulationStream(src or source(), cfg, rank, world, batches, seed, "cpu")


def epoch_batches(s, epoch=0, loader=None):
    s.set_epoch(epoch)
    return list(loader(s) if loader else s)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def distinct_images(batches):
    """Number of distinct images among the batches (bit for bit)."""
    return len({img.numpy().tobytes() for b in batches for img in b["image"]})


def test_same_seed_gives_identical_batches_and_another_seed_differs():
    a, b = epoch_batches(stream(seed=3)), epoch_batches(stream(seed=3))
    assert_same(a, b)
    assert a[0]["image"].shape == (8, 1, 16, 16) and a[0]["image"].dtype == torch.float32
    assert a[0]["label"].dtype == torch.int64 and a[0]["ids"].shape == (8, 3)
    other = epoch_batches(stream(seed=4))
    assert distinct_images(a + other) == 2 * 3 * 8


def test_ranks_epochs_and_batches_never_repeat_images():
    r0, r1 = epoch_batches(stream(rank=0, world=2)), epoch_batches(stream(rank=1, world=2))
    e1 = epoch_batches(stream(rank=0, world=2), epoch=1)
    assert distinct_images(r0 + r1 + e1) == 3 * 3 * 8
    # rank r's batch i is global batch i * world + r; ids say so
    assert [int(b["ids"][0, 1]) for b in r0] == [0, 2, 4] and [int(b["ids"][0, 1]) for b in r1] == [1, 3, 5]
    assert {int(e) for b in e1 for e in b["ids"][:, 0]} == {1}
    # two ranks of world 2 together draw the batches one rank of world 1 draws in twice the batches
    single = epoch_batches(stream(batches=6))
    assert_same(single[0::2], r0)
    assert_same(single[1::2], r1)


def test_a_restarted_iterator_reproduces_its_epoch():
    s = stream(seed=1)
    first = [epoch_batches(s, epoch) for epoch in range(3)]
    resumed = stream(seed=1)
    assert_same(epoch_batches(resumed, 2), first[2])
    assert_same(epoch_batches(resumed, 0), first[0])
    assert distinct_images(first[0] + first[1]) == 2 * 3 * 8


def test_class_counts_follow_the_documented_rotation_and_batches_are_shuffled():
    # 8 images over 3 classes: 2 each, and one more for the 2 classes starting at (global batch index mod 3)
    batches = epoch_batches(stream(batch_size=8, batches=6))
    expected = {0: [3, 3, 2], 1: [2, 3, 3], 2: [3, 2, 3]}
    for b in batches:
        index = int(b["ids"][0, 1])
        assert torch.bincount(b["label"], minlength=3).tolist() == expected[index % 3]
    assert sum(torch.bincount(b["label"], minlength=3) for b in batches[:3]).tolist() == [8, 8, 8]
    assert any(not torch.equal(b["label"], b["label"].sort().values) for b in batches)
    # divisible batch sizes: exactly equal counts in every batch
    for b in epoch_batches(stream(batch_size=9, batches=2)):
        assert torch.bincount(b["label"], minlength=3).tolist() == [3, 3, 3]


def test_images_are_normalised_and_ids_regenerate_their_sample():
    s = stream(normalize="minmax")
    batches = epoch_batches(s, 1)
    flat = torch.cat([b["image"] for b in batches]).flatten(1)
    torch.testing.assert_close(flat.amin(1), torch.zeros(len(flat)), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.amax(1), torch.ones(len(flat)), atol=1e-5, rtol=0)
    epoch, index, position = batches[2]["ids"][5].tolist()
    assert torch.equal(s.batch(epoch, index)["image"][position], batches[2]["image"][5])
    assert s.sample_keys(batches[2]["ids"][5:6]) == [f"epoch 1:batch {index}:sample 5"]


@pytest.mark.parametrize("mode", ["interpolate", "crop"])
def test_data_resize_applies_as_in_the_shard_streams(mode):
    s = stream(resize=8, resize_mode=mode, normalize="minmax", augment=False)
    assert s.image_shape == (1, 8, 8)
    batch = epoch_batches(s)[0]
    assert batch["image"].shape == (8, 1, 8, 8)
    raw = stream(normalize="none", augment=False).batch(0, 0)["image"]
    expected = normalize(resize(raw, 8, mode), "minmax")
    torch.testing.assert_close(batch["image"], expected)


def test_targets_are_present_finite_and_follow_their_images():
    batches = epoch_batches(stream(batch_size=12, targets=["theta_E", "substructure_mass", "log10_exposure_time"]))
    for b in batches:
        t = b["target"]
        assert t.shape == (12, 3) and t.dtype == torch.float32 and torch.isfinite(t).all()
        assert ((t[:, 0] >= 0.8) & (t[:, 0] <= 1.8)).all()                         # lens.theta_E_range
        mass, label = t[:, 1], b["label"]
        assert (mass[label == CLASSES.index("no_sub")] == 0).all()                 # shuffled with the labels
        assert torch.allclose(mass[label == CLASSES.index("axion")], torch.tensor(3e10))
        cdm = mass[label == CLASSES.index("cdm")]
        assert ((cdm > 0) & (cdm < 25e10)).all()
        torch.testing.assert_close(t[:, 2], torch.full((12,), math.log10(4 * 565.0)))   # Model II's fixed exposure


@pytest.mark.parametrize("key, message", [("axion_mass", "no finite value for class no_sub, cdm"),
                                          ("log10_substructure_mass", "no finite value for class no_sub"),
                                          ("thetaE", "not simulator metadata")])
def test_a_target_some_class_lacks_is_refused_at_build_time(key, message):
    with pytest.raises(ValueError, match=f"{key}.*{message}"):
        stream(targets=[key])


@pytest.mark.parametrize("overrides, key", [({"instrument.n_pixx": 3}, "instrument.n_pixx"),
                                            ({"instrument.n_pix": 0}, "instrument.n_pix"),
                                            ({"lens": {"theta_E": -1.0}}, "lens.theta_E"),
                                            ({"instrument.n_pix": "big"}, "instrument.n_pix"),
                                            ({"preset": "model_i"}, "preset")])
def test_a_bad_simulator_override_fails_when_the_config_is_loaded(overrides, key):
    with pytest.raises(ValueError, match=f"data.simulator.overrides.*{key}"):
        from_dict(SimulationSourceConfig, {"preset": "model_ii", "overrides": overrides})


def test_bad_preset_and_device_are_named():
    with pytest.raises(ValueError, match="data.simulator.preset.*model_iv"):
        SimulationSourceConfig(preset="model_iv")
    with pytest.raises(ValueError, match="data.simulator.device"):
        SimulationSourceConfig(device="tpu")
    with pytest.raises(ValueError, match="data.simulator.device='cuda' with training on cpu"):
        simulation_device("cuda", "cpu")
    assert simulation_device("auto", "cpu") == torch.device("cpu")


def test_two_dataloader_workers_yield_the_same_batches_as_none():
    alone = epoch_batches(stream(batches=5, workers=0), 2)
    s = stream(batches=5, workers=2)
    pooled = epoch_batches(s, 2, loader=simulation_loader)
    assert_same(pooled, alone)                      # worker w makes batches w, w + 2, ...; handed out in order
    assert_same(epoch_batches(s, 2, loader=lambda d: make_loader(d, d.cfg)), alone)
    assert distinct_images(pooled) == 5 * 8


def test_describe_regenerates_the_stream_bit_for_bit():
    s = stream(seed=7, batch_size=6, normalize="standardize")
    record = json.loads(json.dumps(s.describe()))
    simulator = dict(record["simulator"])
    rebuilt = SimulationStream(
        SimulationSourceConfig(preset=simulator.pop("preset"), overrides=flatten(simulator)),
        StreamConfig(batch_size=record["batch_size"], normalize=record["normalize"], augment=record["augment"],
                     targets=record["targets"]),
        0, record["world"], record["batches_per_epoch"], record["seed"], record["device"])
    assert_same(epoch_batches(rebuilt, 4), epoch_batches(s, 4))
    assert record["simulator"]["instrument"]["n_pix"] == 16 and record["simulator"]["lens"]["randomize"] is True


def test_the_eval_set_is_written_once_reused_and_another_config_refused(tmp_path):
    src = source(eval_per_class=5, probe_per_class=2, eval_seed=11)
    out = prepare_eval_set(src, tmp_path / "eval", samples_per_record=4)
    manifest = load_manifest(out)
    assert manifest["image_shape"] == [1, 16, 16]
    assert manifest["splits"]["val"]["class_counts"] == {c: 5 for c in CLASSES}
    assert manifest["splits"]["train"]["class_counts"] == {c: 2 for c in CLASSES}
    files = sorted(p for p in out.iterdir())
    before = {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in files}

    assert prepare_eval_set(source(eval_per_class=5, probe_per_class=2, eval_seed=11), out) == out
    after = {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in sorted(out.iterdir())}
    assert after == before

    # the existing evaluation code reads it: every val sample once, normalised
    batches = list(eval_loader(out, StreamConfig(batch_size=4, num_workers=0)))
    labels = torch.cat([b["label"] for b in batches])
    assert torch.bincount(labels, minlength=3).tolist() == [5, 5, 5]
    assert len({tuple(i) for b in batches for i in b["ids"].tolist()}) == 15
    # its raw images are not the training stream's, even with the same seed
    raw = list(eval_loader(out, StreamConfig(batch_size=15, num_workers=0, normalize="none")))
    train = epoch_batches(stream(seed=11, batches=2, normalize="none", augment=False))
    assert distinct_images(train + raw) == 2 * 8 + 15

    with pytest.raises(ValueError, match=r"instrument.n_pix: 16 there, 8 wanted"):
        prepare_eval_set(source(eval_per_class=5, probe_per_class=2, eval_seed=11, sim={"instrument.n_pix": 8}), out)
    with pytest.raises(ValueError, match=r"seed: 11 there, 12 wanted"):
        prepare_eval_set(source(eval_per_class=5, probe_per_class=2, eval_seed=12), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {k: v[0] for k, v in before.items()}


def test_an_eval_set_without_probe_split_has_val_only(tmp_path):
    out = prepare_eval_set(source(eval_per_class=2, probe_per_class=0), tmp_path / "eval")
    assert list(load_manifest(out)["splits"]) == ["val"]
