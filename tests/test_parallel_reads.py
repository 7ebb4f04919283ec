"""DataLoader workers share a rank's records instead of each reading them all: every record of an epoch is decoded
once, by worker j mod W, whatever the number of workers; the batches stay those of 0 workers (the determinism tests
check the images bit for bit) and keep their order."""
import os
from collections import Counter
from dataclasses import replace

import pytest
import torch

from dlscale.data.records import records_in_flight
from dlscale.data.stream import ShardSet, StreamConfig, eval_loader, train_loader

WORKERS = (0, 1, 2, 4)


@pytest.fixture(scope="module")
def records_data(make_shards):
    """64 train / 45 val samples of 1x8x8 in shards of 16 and records of 4 (val: 3 shards, 12 records)."""
    return make_shards({"train": 64, "val": 45}, shard_size=16, samples_per_record=4)


@pytest.fixture
def decodes(monkeypatch, tmp_path):
    """Every `ShardSet.decode` call, in this process or a forked DataLoader worker, as (pid, shard, record)."""
    log = tmp_path / "decodes.txt"
    original = ShardSet.decode

    def counted(self, index, r, key, record):
        with open(log, "a") as f:    # one short O_APPEND write per call: whole lines from concurrent workers
            f.write(f"{os.getpid()} {index} {r}\n")
        return original(self, index, r, key, record)
    monkeypatch.setattr(ShardSet, "decode", counted)

    def read() -> list[tuple[int, int, int]]:
        calls = [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return calls
    return read


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", WORKERS)
def test_eval_decodes_each_record_of_the_rank_once_shared_among_the_workers(records_data, decodes, workers, world):
    cfg = StreamConfig(batch_size=5, num_workers=workers, normalize="none")
    shards = ShardSet(records_data, "val", cfg)
    for rank in range(world):
        ids = [tuple(i) for b in eval_loader(records_data, cfg, rank, world) for i in b["ids"].tolist()]
        calls = decodes()
        mine = [i for i in range(len(shards.urls)) if i % world == rank]
        expected = sorted((i, r) for i in mine for r in range(shards.shards[i]["records"]))
        assert sorted((i, r) for _, i, r in calls) == expected          # each record once, none of another rank
        assert sorted({(i, r) for i, r, _ in ids}) == expected
        per_worker = sorted(Counter(pid for pid, _, _ in calls).values())
        share, extra = divmod(len(expected), max(workers, 1))
        assert per_worker == sorted([share + 1] * extra + [share] * (max(workers, 1) - extra))
        if workers:
            assert os.getpid() not in {pid for pid, _, _ in calls}       # the workers decode, not this process


@pytest.mark.parametrize("workers", WORKERS[1:])
def test_training_decodes_each_drawn_record_once_whatever_the_workers(records_data, decodes, workers):
    cfg = StreamConfig(batch_size=4, num_workers=0, shuffle_buffer=8, normalize="none")
    reference = list(train_loader(records_data, cfg, batches=24))
    used = len(decodes())                        # 0 workers: the records the epoch's batches needed, no more
    batches = list(train_loader(records_data, replace(cfg, num_workers=workers), batches=24))
    calls = decodes()
    per_worker = Counter(pid for pid, _, _ in calls)
    ahead = records_in_flight(workers) + 1
    assert used <= len(calls) <= used + workers * ahead   # read ahead by the queues, no more
    assert len(per_worker) == workers and max(per_worker.values()) - min(per_worker.values()) <= ahead
    for a, b in zip(reference, batches, strict=True):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["image"], b["image"])


def test_eval_batches_come_in_the_same_order_for_any_worker_count(records_data):
    def order(workers):
        cfg = StreamConfig(batch_size=5, num_workers=workers)
        return [b["ids"].tolist() for b in eval_loader(records_data, cfg, split="val")]
    reference = order(0)
    assert all(order(workers) == reference for workers in WORKERS[1:])


def test_a_shared_memory_too_small_for_the_ring_is_refused_naming_the_need(records_data, monkeypatch):
    class Tiny:
        f_bavail, f_frsize = 0, 4096           # a full /dev/shm
    monkeypatch.setattr("dlscale.data.stream.os.statvfs", lambda path: Tiny())
    cfg = StreamConfig(batch_size=4, num_workers=2, shuffle_buffer=8)
    with pytest.raises(RuntimeError, match=r"needs \d+ MiB of shared memory, /dev/shm has 0 MiB free"):
        next(iter(train_loader(records_data, cfg, batches=4)))
    assert len(list(train_loader(records_data, replace(cfg, num_workers=0), batches=4))) == 4   # no shared memory
