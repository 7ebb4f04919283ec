"""Training and evaluation streams over shards: normalisation, augmentation, epochs, corrupt shards, pipes, targets."""
import logging
import tarfile

import numpy as np
import pytest
import torch

from dlscale.data.shardset import ShardSet
from dlscale.data.stream import eval_loader, train_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import augment, normalize
from dlscale.data.tario import CorruptShardError


@pytest.fixture(scope="module")
def uneven(make_shards):
    """30 train / 10 val samples of 1x8x8 in shards of 7 (the last holds 2) and records of 3 (the last holds 1)."""
    return make_shards({"train": 30, "val": 10}, shard_size=7, samples_per_record=3)


def scaled_images(n=6, size=32, seed=0):
    """Random images at very different offsets and scales, so per-batch normalisation would show."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 2, n)[:, None, None, None]
    offset = torch.linspace(-5, 5, n)[:, None, None, None]
    return torch.rand((n, 1, size, size), generator=g) * scale + offset


def train_batches(data_dir, epoch=0, seed=0, rank=0, world=1, batches=5, **cfg):
    cfg = StreamConfig(**{"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, "normalize": "none", **cfg})
    loader = train_loader(data_dir, cfg, rank=rank, world=world, seed=seed, batches=batches)
    loader.dataset.set_epoch(epoch)
    return list(loader)


def test_minmax_maps_each_image_to_0_1():
    images = scaled_images()
    out = normalize(images, "minmax").flatten(1)
    torch.testing.assert_close(out.amin(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.amax(1), torch.ones(6), atol=1e-5, rtol=0)
    flat = images.flatten(1).double()
    expected = (flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_standardize_gives_each_image_mean_0_std_1():
    out = normalize(scaled_images(), "standardize").flatten(1).double()
    torch.testing.assert_close(out.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(1, correction=0), torch.ones(6, dtype=torch.float64), atol=2e-3, rtol=0)


def test_log_is_log1p_above_the_minimum_then_minmax():
    images = scaled_images()
    out = normalize(images, "log").flatten(1).double()
    flat = images.flatten(1).double()
    logged = torch.log1p(flat - flat.amin(1, keepdim=True))
    expected = (logged - logged.amin(1, keepdim=True)) / (logged.amax(1, keepdim=True) - logged.amin(1, keepdim=True))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_none_keeps_raw_values():
    images = scaled_images()
    assert torch.equal(normalize(images, "none"), images)


@pytest.mark.parametrize("method", ["minmax", "standardize", "log"])
def test_constant_image_normalizes_to_finite_values(method):
    assert torch.isfinite(normalize(torch.full((2, 1, 8, 8), 7.0), method)).all()


def dihedral(image):
    """The 8 rotations and reflections of a (C,H,W) image."""
    rotations = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
    return rotations + [r.flip(2) for r in rotations]


def test_augment_keeps_the_pixel_values_of_each_image():
    images = torch.rand((64, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    out = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(out.flatten(1).sort(1).values, images.flatten(1).sort(1).values)


def test_augment_applies_only_and_all_8_dihedral_transforms():
    images = torch.rand((200, 2, 8, 8), generator=torch.Generator().manual_seed(0))
    out = augment(images, torch.Generator().manual_seed(1))
    used = set()
    for x, y in zip(images, out):
        matches = [k for k, t in enumerate(dihedral(x)) if torch.equal(t, y)]
        assert len(matches) == 1
        used.add(matches[0])
    assert used == set(range(8))


def test_train_batches_have_the_configured_shapes(uneven):
    batch = train_batches(uneven, batches=1)[0]
    assert batch["image"].shape == (4, 1, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    assert batch["ids"].shape == (4, 3)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_train_stream_yields_exactly_the_requested_batches(uneven, workers):
    batches = train_batches(uneven, batches=5, num_workers=workers)
    assert [len(b["label"]) for b in batches] == [4] * 5


def test_train_stream_repeats_for_the_same_seed_and_epoch(uneven):
    first = train_batches(uneven, epoch=3, num_workers=2, augment=True)
    second = train_batches(uneven, epoch=3, num_workers=2, augment=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["image"], b["image"])


def ids_of(batches):
    return torch.cat([b["ids"] for b in batches]).tolist()


def test_train_stream_order_changes_with_the_epoch(uneven):
    assert ids_of(train_batches(uneven, epoch=0)) != ids_of(train_batches(uneven, epoch=1))


def test_train_stream_order_changes_with_the_seed(uneven):
    assert ids_of(train_batches(uneven, seed=0)) != ids_of(train_batches(uneven, seed=1))


def test_train_stream_differs_between_ranks(uneven):
    assert ids_of(train_batches(uneven, rank=0, world=2)) != ids_of(train_batches(uneven, rank=1, world=2))


@pytest.fixture
def one_corrupt(make_shards):
    """Two train shards; the second is cut in the middle of a record."""
    data_dir = make_shards({"train": 12}, shard_size=7, samples_per_record=3)
    shard = data_dir / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2 + 100])
    return data_dir


def test_corrupt_shard_is_skipped_and_counted_in_a_warning(one_corrupt, caplog):
    with caplog.at_level(logging.WARNING, logger="dlscale.data.stream"):
        batches = train_batches(one_corrupt, batches=12)
    assert len(batches) == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("train-000001.tar" in w and "truncated" in w for w in warnings)
    assert f"({len(warnings)} skipped so far" in warnings[-1]


def test_corrupt_shard_raises_when_strict(one_corrupt):
    with pytest.raises(CorruptShardError, match="train-000001.tar.*truncated"):
        train_batches(one_corrupt, batches=12, strict=True)


def test_all_shards_corrupt_raises_instead_of_hanging(make_shards, deadline):
    data_dir = make_shards({"train": 30}, shard_size=7)
    for shard in data_dir.glob("train-*.tar"):
        shard.write_bytes(shard.read_bytes()[:100])
    with deadline(30):
        with pytest.raises(RuntimeError, match="consecutive shard failures in split 'train'"):
            train_batches(data_dir, batches=3)


def test_eval_stream_raises_on_a_shard_cut_at_a_member_boundary(make_shards):
    data_dir = make_shards({"val": 7}, shard_size=7, samples_per_record=3)
    shard = data_dir / "val-000000.tar"
    with tarfile.open(shard) as tar:
        second_record = [m.offset for m in tar.getmembers() if m.name.endswith("000001.images.npy")][0]
    shard.write_bytes(shard.read_bytes()[:second_record])   # complete first record, then nothing
    with pytest.raises(CorruptShardError, match="val-000000.tar: truncated"):
        list(eval_loader(data_dir, StreamConfig(num_workers=0)))


def eval_all(data_dir, **cfg):
    cfg = StreamConfig(**{"batch_size": 4, "num_workers": 0, "normalize": "none", **cfg})
    batches = list(eval_loader(data_dir, cfg, split="val"))
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def test_eval_stream_yields_stored_images_unaugmented_with_their_ids(uneven, records):
    streamed = eval_all(uneven, augment=True)
    stored = records(uneven, "val")
    assert streamed["ids"].tolist() == [list(s.id) for s in stored]
    assert torch.equal(streamed["image"], torch.from_numpy(np.stack([s.image for s in stored])))
    assert streamed["label"].tolist() == [s.label for s in stored]


def test_pipe_url_template_is_refused_unless_allowed(uneven):
    with pytest.raises(ValueError, match="runs a shell command.*allow_pipe"):
        ShardSet(uneven, "val", StreamConfig(url_template=f"pipe:cat {uneven}/{{name}}"))


def test_pipe_url_template_reads_the_same_samples_when_allowed(uneven):
    piped = eval_all(uneven, url_template=f"pipe:cat {uneven}/{{name}}", allow_pipe=True)
    local = eval_all(uneven)
    assert piped.keys() == local.keys()
    assert all(torch.equal(piped[key], local[key]) for key in local)


def test_regression_targets_come_from_metadata_keys(uneven):
    streamed = eval_all(uneven, targets=["theta_E"])
    assert streamed["target"].shape == (10, 1)
    torch.testing.assert_close(streamed["target"][:, 0], streamed["image"].flatten(1).mean(1))


def test_missing_regression_target_is_named_in_the_error(uneven):
    with pytest.raises(ValueError, match="no regression target 'gamma1'"):
        eval_all(uneven, targets=["theta_E", "gamma1"])
