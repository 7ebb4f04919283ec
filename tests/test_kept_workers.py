"""The training stream keeps its DataLoader workers from one epoch to the next (their pages of the batch ring stay
mapped): the batches of every epoch are those of fresh workers and of reading in one process, also after an epoch
the consumer left half-way; the same worker processes serve every epoch and stop when the stream is dropped."""
import gc
import multiprocessing

import pytest
import torch

from dlscale.data.stream import StreamConfig, train_loader

EPOCHS = 3


@pytest.fixture(scope="module")
def data(make_shards):
    return make_shards({"train": 60}, shard_size=20, samples_per_record=6)


def epoch(loader, stream, e: int, stop: int | None = None) -> list:
    """Epoch e's batches (ids and images) through a new loader of `stream`, as the trainer asks for each epoch; the
    first `stop` only, the consumer then leaving the epoch."""
    stream.set_epoch(e)
    batches = []
    for batch in type(loader)(stream, loader.cfg):
        batches.append((batch["ids"].tolist(), batch["image"].clone()))
        if len(batches) == stop:
            break
    return batches


def fresh(data, cfg: StreamConfig, e: int) -> list:
    loader = train_loader(data, cfg, batches=12)
    return epoch(loader, loader.dataset, e)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(i == j and torch.equal(x, y) for (i, x), (j, y) in zip(a, b))


@pytest.mark.parametrize("window", ["default", "tiny"])   # tiny: many rows wait in spill rows
@pytest.mark.parametrize("workers", [1, 2])
def test_kept_workers_give_every_epoch_the_batches_of_fresh_workers(data, monkeypatch, workers, window):
    if window == "tiny":
        monkeypatch.setattr("dlscale.data.stream.WINDOW_FILLS", 0)
    cfg = StreamConfig(batch_size=4, num_workers=workers, shuffle_buffer=8)
    before = set(multiprocessing.active_children())
    loader = train_loader(data, cfg, batches=12)
    stream, kept, serving = loader.dataset, [], None
    for e in range(EPOCHS):
        kept.append(epoch(loader, stream, e))
        children = set(multiprocessing.active_children()) - before
        assert len(children) == workers and children == (serving or children), f"epoch {e}: other workers"
        serving = children
    for e, batches in enumerate(kept):
        assert same(batches, fresh(data, cfg, e)), f"epoch {e}, fresh workers"
        assert same(batches, fresh(data, StreamConfig(batch_size=4, num_workers=0, shuffle_buffer=8), e)), e
    assert not same(kept[0], kept[1])
    del loader, stream
    gc.collect()
    assert not serving & set(multiprocessing.active_children()), "the kept workers outlived their stream"


def test_an_epoch_left_half_way_leaves_the_next_epochs_exact(data, monkeypatch):
    monkeypatch.setattr("dlscale.data.stream.WINDOW_FILLS", 0)
    cfg = StreamConfig(batch_size=4, num_workers=2, shuffle_buffer=8)
    loader = train_loader(data, cfg, batches=12)
    stream = loader.dataset
    assert same(epoch(loader, stream, 0, stop=3), fresh(data, cfg, 0)[:3])
    for e in (1, 2):
        assert same(epoch(loader, stream, e), fresh(data, cfg, e)), e


def test_a_stream_with_another_worker_count_starts_other_workers(data):
    cfg = StreamConfig(batch_size=4, num_workers=2, shuffle_buffer=8)
    loader = train_loader(data, cfg, batches=12)
    first = epoch(loader, loader.dataset, 0)
    loader.cfg = StreamConfig(batch_size=4, num_workers=1, shuffle_buffer=8)
    assert same(epoch(loader, loader.dataset, 1), fresh(data, cfg, 1)) and same(first, fresh(data, cfg, 0))
