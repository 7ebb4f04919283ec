"""Streams across real processes (gloo on 127.0.0.1): exact evaluation and equal training batch counts per rank.

One start of `world` processes per world size runs every case (datasets x DataLoader worker counts) and reports the
gathered results; the tests below check them case by case. Starting processes costs seconds, the cases milliseconds.
"""
import json
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dlscale.data.shards import load_manifest
from dlscale.data.stream import batches_per_epoch, eval_loader, train_loader
from dlscale.data.stream_config import StreamConfig

pytestmark = pytest.mark.slow   # every test reads the streams on 2 ranks under torchrun

WORLDS = (2, 3)
WORKERS = (0, 1, 2)
# split sizes and shard size. "uneven": 5 shards (4 x 7 samples + 2) in records of 3 (the last of each shard holds
# 1 or 2); at world 3 with 2 workers one worker slot gets no shard. "one_shard": every rank but one gets no shard.
DATASETS = {"uneven": ({"train": 30, "val": 30}, 7), "one_shard": ({"train": 5, "val": 5}, 7)}
BATCH = 4
TIMEOUT_S = 60    # per collective (a rank stalled elsewhere makes the others fail there)
WORLD_BUDGET_S = 360   # the whole start of one world: ~50 s idle, 2-3x that on a machine loaded by other jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather(value, world):
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _rank_main(rank, world, port, data_dirs, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        for name, data_dir in data_dirs.items():
            for workers in WORKERS:
                cfg = StreamConfig(batch_size=BATCH, num_workers=workers, normalize="none", augment=False,
                                   shuffle_buffer=8)
                ids = [i for batch in eval_loader(data_dir, cfg, rank, world) for i in batch["ids"].tolist()]
                results[f"eval/{name}/{workers}"] = _gather(ids, world)
                train_counts = [len(batch["label"]) for batch in train_loader(data_dir, cfg, rank, world, seed=0)]
                results[f"train/{name}/{workers}"] = _gather(train_counts, world)
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def datasets(make_shards):
    return {name: make_shards(splits, shard_size=shard_size) for name, (splits, shard_size) in DATASETS.items()}


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def gathered(request, datasets, tmp_path_factory):
    """Results of one start of `world` gloo processes: {"eval|train/<dataset>/<workers>": per-rank lists}."""
    world = request.param
    result_file = tmp_path_factory.mktemp(f"world{world}") / "results.json"
    # Spawned ranks are fresh interpreters, as torchrun starts them, and their DataLoader workers fork as they do
    # under torchrun. (Ranks forked from a fork server stalled now and then in their forked DataLoader workers.)
    context = mp.start_processes(_rank_main, args=(world, _free_port(), {k: str(v) for k, v in datasets.items()},
                                                   str(result_file)),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + WORLD_BUDGET_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):   # True once all have exited
            assert time.monotonic() < deadline, f"{world} processes still running after {WORLD_BUDGET_S} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return world, json.loads(result_file.read_text())


CASES = [(name, workers) for name in DATASETS for workers in WORKERS]
CASE_IDS = [f"{name}-workers{workers}" for name, workers in CASES]


@pytest.mark.parametrize("name, workers", CASES, ids=CASE_IDS)
def test_eval_stream_yields_every_sample_exactly_once_across_ranks(gathered, records, datasets, name, workers):
    world, results = gathered
    per_rank = results[f"eval/{name}/{workers}"]
    assert len(per_rank) == world
    seen = sorted(tuple(i) for ids in per_rank for i in ids)
    assert len(seen) == load_manifest(datasets[name])["splits"]["val"]["samples"]
    assert seen == sorted(s.id for s in records(datasets[name], "val"))


@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"workers{w}")
def test_ranks_without_shards_still_join_the_gather(gathered, workers):
    world, results = gathered
    per_rank = results[f"eval/one_shard/{workers}"]
    assert len(per_rank) == world
    assert sorted(map(len, per_rank)) == [0] * (world - 1) + [5]


@pytest.mark.parametrize("name, workers", CASES, ids=CASE_IDS)
def test_train_stream_yields_the_same_batch_count_on_every_rank(gathered, name, workers):
    world, results = gathered
    expected = batches_per_epoch(DATASETS[name][0]["train"], BATCH, world)
    assert results[f"train/{name}/{workers}"] == [[BATCH] * expected] * world
