"""Workers write each row straight into its batch: the shuffle plan puts every row where the shuffle buffer would
(fill, permute, cut from the end), whatever the number of workers and however many rows wait in spill rows; a batch
the consumer holds is never written over."""
import numpy as np
import pytest
import torch

from dlscale.data.shardset import ShardSet
from dlscale.data.stream import SHUFFLE_KEY, StreamConfig, train_loader

WORKERS = (0, 1, 2, 4)


@pytest.fixture(scope="module")
def data(make_shards):
    """90 train samples of 1x8x8 in shards of 20 (the last holds 10) and records of 6 (the last of a shard: 2 or 4)."""
    return make_shards({"train": 90}, shard_size=20, samples_per_record=6)


def shuffled_ids(data, cfg: StreamConfig, batches: int, seed: int = 0, epoch: int = 0) -> list[list]:
    """The batches' sample ids as the shuffle buffer cuts them, written out here from the records in their epoch
    order: fill to 2 x low + batch, permute the rows held, cut batches from the end while low + batch remain."""
    shards = ShardSet(data, "train", cfg)
    draws = np.random.default_rng([seed, epoch, 0])
    rng = np.random.default_rng([seed, epoch, 0, SHUFFLE_KEY])
    spr, bs = shards.manifest["record_layout"]["samples_per_record"], cfg.batch_size
    low = max(cfg.shuffle_buffer, bs) // 2
    held, out = [], []
    while len(out) < batches:
        index = int(draws.integers(len(shards.urls)))
        shard = shards.shards[index]
        for r in range(shard["records"]):
            held += [[index, r, p] for p in range(min(spr, shard["samples"] - r * spr))]
            if len(held) < 2 * low + bs:
                continue
            held = [held[i] for i in rng.permutation(len(held))]
            while len(held) >= low + bs and len(out) < batches:
                out.append(held[-bs:])
                held = held[:-bs]
            if len(out) == batches:
                return out
    return out


def streamed(data, cfg: StreamConfig, batches: int, epochs: int = 1) -> tuple[list, list, object]:
    loader = train_loader(data, cfg, batches=batches)
    ids, images = [], []
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            ids.append(batch["ids"].tolist())
            images.append(batch["image"].clone())
    return ids, images, loader.dataset


@pytest.mark.parametrize("window", ["default", "tiny"])
def test_rows_land_where_the_shuffle_buffer_puts_them_for_any_worker_count(data, monkeypatch, window):
    """`tiny`: rows go straight into their batch only within one batch of their record, most wait in spill rows."""
    if window == "tiny":
        monkeypatch.setattr("dlscale.data.stream.WINDOW_FILLS", 0)
    cfg = StreamConfig(batch_size=4, num_workers=0, shuffle_buffer=8)
    expected = shuffled_ids(data, cfg, 30) + shuffled_ids(data, cfg, 30, epoch=1)
    reference = None
    for workers in WORKERS:
        ids, images, stream = streamed(data, StreamConfig(batch_size=4, num_workers=workers, shuffle_buffer=8), 30,
                                       epochs=2)
        assert ids == expected, f"{workers} workers: batches hold other samples than the shuffle buffer cuts"
        spilled = stream.cuts.spilled / stream.cuts.taken
        assert (spilled > 0.5) if window == "tiny" else (spilled < 0.5)
        reference = reference or images
        assert all(torch.equal(a, b) for a, b in zip(reference, images, strict=True)), f"{workers} workers"


def test_a_batch_the_consumer_holds_is_never_written_over(make_shards, monkeypatch):
    """The held batch's images stay in the ring (a view of a slot) while the workers write ~40 batches more through a
    ring of a few slots."""
    monkeypatch.setattr("dlscale.data.stream.WINDOW_FILLS", 0)
    data = make_shards({"train": 120}, shard_size=40, samples_per_record=8, shape=(1, 16, 16))
    cfg = StreamConfig(batch_size=8, num_workers=2, shuffle_buffer=16)
    loader = train_loader(data, cfg, batches=48)
    held = copy = None
    for k, batch in enumerate(loader):
        if k == 3:
            held, copy = batch, {key: value.clone() for key, value in batch.items()}
    ring = loader.dataset.ring
    start = ring.store[0].data_ptr()
    assert start <= held["image"].data_ptr() < start + ring.store[0].nbytes     # handed on without a copy
    assert ring.slots * cfg.batch_size < 48 * cfg.batch_size                        # its slot would have served again
    assert all(torch.equal(held[key], copy[key]) for key in copy)


@pytest.mark.parametrize("window", ["default", "tiny"])
def test_a_lost_record_leaves_its_rows_out_of_their_batches(make_shards, monkeypatch, window):
    """Batches keep their other rows where they were, images included (shorter batches), for 0 and 2 workers.
    `tiny`: most rows wait in spill rows, which the writer of the record a batch is cut at copies into it, lost or
    not."""
    if window == "tiny":
        monkeypatch.setattr("dlscale.data.stream.WINDOW_FILLS", 0)
    data = make_shards({"train": 80}, shard_size=40, samples_per_record=5)
    cfg = StreamConfig(batch_size=8, num_workers=0, shuffle_buffer=32)
    expected = shuffled_ids(data, cfg, 12)
    _, whole, _ = streamed(data, cfg, 12)
    shard = data / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])      # its first records stay readable
    for workers in (0, 2):
        ids, images, stream = streamed(data, StreamConfig(batch_size=8, num_workers=workers, shuffle_buffer=32), 12)
        read = {r for batch in ids for s, r, _ in batch if s == 1}
        assert read == set(range(len(read))) and 0 < len(read) < 8
        kept = [[p for p, i in enumerate(batch) if i[0] != 1 or i[1] in read] for batch in expected]
        assert ids == [[batch[p] for p in positions] for batch, positions in zip(expected, kept)]
        assert all(torch.equal(got, before[positions]) for got, before, positions in zip(images, whole, kept))
        assert sum(stream.skips.totals()[0]) > 0
        if window == "tiny":
            assert stream.cuts.spilled / stream.cuts.taken > 0.5


@pytest.mark.parametrize("transforms", ["host", "device"])
def test_unaugmented_rows_are_the_stored_images_for_any_worker_count(data, monkeypatch, transforms):
    """Rows copied into the ring as they are (no augmentation; `device`: not normalised either), spill rows too."""
    monkeypatch.setattr("dlscale.data.stream.WINDOW_FILLS", 0)
    stored = {tuple(i): image for images, _, ids, _ in (r for index in range(5) for r in
                                                         ShardSet(data, "train", StreamConfig()).records(index))
              for i, image in zip(ids.tolist(), images)}
    for workers in (0, 2):
        cfg = StreamConfig(batch_size=4, num_workers=workers, shuffle_buffer=8, augment=False, transforms=transforms,
                           normalize="none")
        ids, images, _ = streamed(data, cfg, 30)
        assert all(torch.equal(image, stored[tuple(i)]) for batch, group in zip(ids, images)
                   for i, image in zip(batch, group))
