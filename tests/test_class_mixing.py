"""Every shard holds every class in proportion (simulate, pack, label subsets), `shards info` / `verify` show and
check per-shard class counts, and the linear probe's train set is stratified: the first probe_samples / classes of
each class in id order, the same for 0 or 2 DataLoader workers and 1 or 2 ranks, refused before a run directory
exists when a class is short."""
import json
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deeplense_fixtures import write_common_test
from dlscale.data.classes import CLASSES
from dlscale.data.mixing import spread_order
from dlscale.data.pack import PackConfig, pack
from dlscale.data.shards import MANIFEST, DatasetWriter, load_manifest, verify
from dlscale.sim import preset_config
from dlscale.sim.write import simulate
from dlscale.train.probe_set import check_probe_set, pick_probe_rows, probe_quota, probe_shard_count


def per_shard_labels(records, data_dir: Path, split: str) -> dict[int, list[int]]:
    """{shard index: labels read from the tars}."""
    shards: dict[int, list[int]] = {}
    for sample in records(data_dir, split):
        shards.setdefault(sample.id[0], []).append(sample.label)
    return shards


def assert_every_shard_mixes(records, data_dir: Path) -> None:
    """Every shard holds each class within 2 samples of its share of the split, as its manifest entry says."""
    manifest = load_manifest(data_dir)
    for split, info in manifest["splits"].items():
        split_counts = np.array([info["class_counts"][c] for c in CLASSES])
        for index, labels in per_shard_labels(records, data_dir, split).items():
            held = np.bincount(labels, minlength=len(CLASSES))
            entry = info["shards"][index]
            assert entry["class_counts"] == dict(zip(CLASSES, held.tolist())), entry["name"]
            share = len(labels) * split_counts / split_counts.sum()
            assert np.all(np.abs(held - share) < 2), f"{entry['name']}: {held.tolist()} vs share {share.round(2)}"


# ---- the writers ------------------------------------------------------------------------------------------------

def test_spread_order_keeps_every_run_within_two_of_each_class_share():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 40, len(CLASSES))
        labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), counts))
        if not len(labels):
            continue
        order = spread_order(labels)
        assert sorted(order.tolist()) == list(range(len(labels)))
        for k in range(len(CLASSES)):    # each class keeps its given order
            assert np.all(np.diff(order[labels[order] == k]) > 0)
        held = np.vstack([np.zeros(len(CLASSES)), np.cumsum(np.eye(len(CLASSES))[labels[order]], 0)])
        share = np.arange(len(labels) + 1)[:, None] * counts / counts.sum()
        assert np.abs(held - share).max() < 1                               # every prefix
        for start in range(len(labels)):
            runs = held[start:] - held[start] - (share[start:] - share[start])
            assert np.abs(runs).max() < 2                                   # every run of consecutive samples


@pytest.mark.parametrize("batch_size, samples_per_record", [(1024, 8), (7, 1), (5, 4)])
def test_simulate_spreads_every_class_over_small_shards(tmp_path, records, batch_size, samples_per_record):
    """Shards of 30 against one simulation batch of 1,024 per class (all 40 images of a class in one batch), and
    against batches of 7 and 5 that shards do not align with."""
    out = simulate(preset_config("model_ii"), 40, tmp_path / "sim", {"train": 0.9, "val": 0.1}, device="cpu",
                   batch_size=batch_size, shard_size=30, samples_per_record=samples_per_record)
    assert_every_shard_mixes(records, out)
    assert len(load_manifest(out)["splits"]["train"]["shards"]) == 4
    assert verify(out) == []


def test_simulate_writes_the_same_shards_for_the_same_seed(tmp_path, records):
    made = [simulate(preset_config("model_ii"), 12, tmp_path / f"sim{i}", device="cpu", batch_size=5, shard_size=10,
                     samples_per_record=4, seed=3) for i in range(2)]
    first, second = (records(out, "train") for out in made)
    assert [s.label for s in first] == [s.label for s in second]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, second))


def test_pack_spreads_every_class_over_small_shards_of_an_unbalanced_source(tmp_path, records):
    src = write_common_test(tmp_path / "src", {"train": 20, "val": 4})
    for i in range(13):                      # axion: 7 train images against 20 of each other class
        (src / "train" / "vort" / f"{i}.npy").unlink()
    outs = [tmp_path / f"packed{i}" for i in range(2)]
    for out in outs:
        pack(PackConfig(src, out, shard_size=5, samples_per_record=2, seed=1), progress=False)
    assert_every_shard_mixes(records, outs[0])
    assert load_manifest(outs[0])["splits"]["train"]["class_counts"] == {"no_sub": 20, "cdm": 20, "axion": 7}
    order = [[s.meta["source_file"] for s in records(out, "train")] for out in outs]
    assert order[0] == order[1]              # deterministic given the seed


SHAPE = (1, 8, 8)


def write_blocked(out: Path, per_class: int, shard_size: int, split: str = "train") -> Path:
    """A dataset written class after class, as `dlscale simulate` wrote before: every train shard holds one class.
    Images of 1x8x8 random pixels, the first one label x 1000 + i (sample i of its class)."""
    rng = np.random.default_rng(0)
    with DatasetWriter(out, SHAPE, {"kind": "test"}, shard_size, 4) as writer:
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                image = rng.random(SHAPE, dtype=np.float32)
                image[0, 0, 0] = label * 1000 + i
                writer.add(split, image, label, {"class": name, "source_file": f"{name}/{i}"})
        writer.add("val", rng.random(SHAPE, dtype=np.float32), 0, {"class": CLASSES[0], "source_file": "val/0"})
    return out


def test_a_label_subset_copy_spreads_classes_over_its_shards_reading_in_bounded_windows(tmp_path, records,
                                                                                      monkeypatch):
    """`_copy_samples` from a source whose shards hold one class each, into shards of 6, holding 5 images at a
    time: every chosen sample arrives once with its metadata, every shard holds every class."""
    from dlscale.transfer import subsets
    source = write_blocked(tmp_path / "blocked", 20, 10)
    chosen = [s for s in records(source, "train") if int(s.meta["source_file"].split("/")[1]) % 2 == 0]
    monkeypatch.setattr(subsets, "COPY_WINDOW_BYTES", 5 * 4 * int(np.prod(SHAPE)))
    with DatasetWriter(tmp_path / "copy", SHAPE, {"kind": "test"}, 6, 2) as writer:
        subsets._copy_samples(source, load_manifest(source), "train", np.array([s.id for s in chosen]), writer)
    copied = records(tmp_path / "copy", "train")
    assert sorted(s.meta["source_file"] for s in copied) == sorted(s.meta["source_file"] for s in chosen)
    assert all(s.image[0, 0, 0] == s.label * 1000 + int(s.meta["source_file"].split("/")[1]) for s in copied)
    assert_every_shard_mixes(records, tmp_path / "copy")


def test_shards_info_lists_class_counts_per_shard(cli, tmp_path):
    out = write_blocked(tmp_path / "blocked", 4, 6)
    result = cli("shards", "info", out)
    assert result.code == 0
    rows = {line.split()[0]: line.split()[1:] for line in result.out.splitlines() if ".tar" in line}
    assert rows["train-000000.tar"] == ["6", "4", "2", "0"] and rows["train-000001.tar"] == ["6", "0", "2", "4"]


def test_shards_verify_warns_on_a_shard_of_one_class(cli, tmp_path):
    out = write_blocked(tmp_path / "blocked", 10, 10)
    result = cli("shards", "verify", out)
    assert result.code == 0 and "OK" in result.out        # intact: a warning, not a problem
    warned = [line for line in result.err.splitlines() if "holds only class" in line]
    assert len(warned) == 3 and "train-000002.tar" in warned[2] and "'axion'" in warned[2]
    assert not any("val-000000.tar" in line for line in warned)     # a split of one class


def test_shards_verify_reports_per_shard_class_counts_that_disagree_with_the_shard(cli, tmp_path):
    out = write_blocked(tmp_path / "blocked", 4, 6)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][1]["class_counts"] = {"no_sub": 2, "cdm": 2, "axion": 2}
    (out / MANIFEST).write_text(json.dumps(manifest))
    result = cli("shards", "verify", out)
    assert result.code == 1 and "train-000001.tar: holds per class {'no_sub': 0, 'cdm': 2, 'axion': 4}" in result.out


# ---- the linear probe's train set ---------------------------------------------------------------------------------

@pytest.mark.parametrize("probe_samples", [3, 4, 5, 10, 29, 44, 45])
def test_the_probe_takes_an_even_share_of_each_class_first_in_id_order(probe_samples):
    labels = np.array([0] * 20 + [1] * 25 + [2] * 15)          # class-blocked, as the shards of older writers
    quota = probe_quota(probe_samples, {"no_sub": 20, "cdm": 25, "axion": 15})
    rows = pick_probe_rows(labels, list(CLASSES), quota)
    held = np.bincount(labels[rows], minlength=3)
    assert held.sum() == probe_samples and held.max() - held.min() <= 1
    for k in range(3):
        assert np.array_equal(rows[labels[rows] == k], np.flatnonzero(labels == k)[:held[k]])


def test_a_probe_of_the_whole_split_or_more_takes_every_sample():
    counts = {"no_sub": 20, "cdm": 25, "axion": 15}
    assert probe_quota(60, counts) is None and probe_quota(4096, counts) is None
    assert np.array_equal(pick_probe_rows(np.zeros(60, int), list(CLASSES), None), np.arange(60))


def test_the_probe_reads_the_leading_shards_that_hold_every_class_share():
    shards = [{"samples": 10, "class_counts": {"no_sub": 10, "cdm": 0, "axion": 0}},
              {"samples": 10, "class_counts": {"no_sub": 0, "cdm": 10, "axion": 0}},
              {"samples": 10, "class_counts": {"no_sub": 0, "cdm": 0, "axion": 10}},
              {"samples": 10, "class_counts": {"no_sub": 3, "cdm": 3, "axion": 4}}]
    counts = {"no_sub": 13, "cdm": 13, "axion": 14}
    assert probe_shard_count(shards, list(CLASSES), probe_quota(30, counts)) == 3
    assert probe_shard_count(shards, list(CLASSES), probe_quota(33, counts)) == 4
    assert probe_shard_count(shards, list(CLASSES), None) == 4
    older = [{"samples": 10}] * 4          # a manifest without per-shard counts: every shard
    assert probe_shard_count(older, list(CLASSES), probe_quota(3, counts)) == 4


@pytest.mark.parametrize("probe_samples, message", [
    (60, "eval.probe_samples=60 takes the first 20 train samples of class 'axion' (an even share per class), but "
         "the train split of D holds 12 (per class: {'no_sub': 40, 'cdm': 40, 'axion': 12}); set "
         "eval.probe_samples <= 36, or >= 92 for the whole split, or 0 for no probe"),
    (2, "eval.probe_samples=2: the linear probe needs a train sample of each of the 3 classes")])
def test_a_class_short_of_its_probe_share_is_refused_naming_it(probe_samples, message):
    with pytest.raises(ValueError) as err:
        check_probe_set(probe_samples, {"no_sub": 40, "cdm": 40, "axion": 12}, "D")
    assert message in str(err.value)
    for fits in (36, 92, 4096, 0):
        check_probe_set(fits, {"no_sub": 40, "cdm": 40, "axion": 12}, "D")
    with pytest.raises(ValueError, match="holds no sample of class 'axion'"):
        check_probe_set(4096, {"no_sub": 40, "cdm": 40, "axion": 0}, "D")


def test_training_with_a_class_short_of_its_probe_share_stops_before_the_run_directory(cli, tmp_path, tiny_args):
    data = tmp_path / "unbalanced"
    with DatasetWriter(data, (1, 8, 8), {"kind": "test"}, 16, 4) as writer:
        for split, per_class in (("train", (40, 40, 12)), ("val", (3, 3, 3))):
            for label, n in enumerate(per_class):
                for i in range(n):
                    writer.add(split, np.random.default_rng(i).random((1, 8, 8), np.float32), label, {})
    run = tmp_path / "run"
    result = cli("train", "--stage", "supervised", "--data", data, "--run-dir", run, *tiny_args,
                 "--eval.probe_samples=60")
    assert result.code == 2
    assert f"takes the first 20 train samples of class 'axion' (an even share per class), but the train split of " \
           f"{data} holds 12" in result.err
    assert not run.exists()


# ---- the probe's train set across DataLoader workers and ranks (real gloo processes) -----------------------------

PROBE_SAMPLES = (4, 44, 90)
CASES = [("blocked", workers, n) for workers in (0, 2) for n in PROBE_SAMPLES]
TIMEOUT_S = 60
WORLD_BUDGET_S = 600      # one start of 2 processes: under a minute idle, several times that on a loaded machine


def _probe_cases(rank: int, world: int, data_dirs: dict, cases: list, out_dir: str) -> None:
    """The probe features of each (dataset, workers, probe_samples) case on rank `rank` of `world`, saved by
    rank 0 as <dataset>-w<workers>-p<probe_samples>-world<world>.npz."""
    from dlscale.distributed import DistInfo
    from dlscale.train.config import load_config
    from dlscale.train.evaluation import Evaluation, probe_features
    from dlscale.train.model import build_run_model
    for name, workers, probe_samples in cases:
        cfg = load_config(None, ["--model.encoder.name=small", "--model.encoder.width=4", "--data.batch_size=5",
                                 f"--data.num_workers={workers}", f"--eval.probe_samples={probe_samples}"],
                          stage="supervised", data_dir=data_dirs[name], run_dir=out_dir)
        torch.manual_seed(0)
        model = build_run_model(cfg, SHAPE, None)
        ev = Evaluation(cfg, load_manifest(data_dirs[name]), DistInfo(rank, world, rank), torch.device("cpu"),
                        torch.float32, Path(out_dir))
        features, _ = probe_features(model, ev)
        if rank == 0:
            np.savez(Path(out_dir) / f"{name}-w{workers}-p{probe_samples}-world{world}.npz",
                     ids=features["ids"], labels=features["labels"], features=features["features"])


def _probe_rank(rank: int, world: int, port: int, data_dirs: dict, cases: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        _probe_cases(rank, world, data_dirs, cases, out_dir)
    finally:
        dist.destroy_process_group()


def _two_ranks(data_dirs: dict, cases: list, out_dir: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_probe_rank, args=(2, port, data_dirs, cases, str(out_dir)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + WORLD_BUDGET_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            assert time.monotonic() < deadline, f"2 processes still running after {WORLD_BUDGET_S} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.mark.slow
def test_the_probe_set_is_stratified_and_bitwise_equal_for_any_workers_and_ranks(tmp_path, records):
    """A dataset whose train shards hold one class each (10 per shard, 30 per class): every probe size picks the
    first share of each class in id order, bitwise the same features for workers 0 / 2 on 1 / 2 ranks; and the same
    from its manifest without per-shard counts (as written before them), where the probe reads every shard."""
    blocked = write_blocked(tmp_path / "blocked", 30, 10)
    older = write_blocked(tmp_path / "older", 30, 10)
    manifest = json.loads((older / MANIFEST).read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["class_counts"]
    (older / MANIFEST).write_text(json.dumps(manifest))
    data_dirs = {"blocked": str(blocked), "older": str(older)}
    _probe_cases(0, 1, data_dirs, CASES, str(tmp_path))
    _two_ranks(data_dirs, [*CASES, ("older", 2, 44)], tmp_path)
    truth = records(blocked, "train")          # in id order
    labels = np.array([s.label for s in truth])
    for probe_samples in PROBE_SAMPLES:
        quota = probe_quota(probe_samples, {c: 30 for c in CLASSES})
        expected = [truth[i].id for i in pick_probe_rows(labels, list(CLASSES), quota)]
        reference = np.load(tmp_path / f"blocked-w0-p{probe_samples}-world1.npz")
        assert [tuple(i) for i in reference["ids"].tolist()] == expected
        held = np.bincount(reference["labels"], minlength=3)
        assert held.sum() == min(probe_samples, 90) and held.max() - held.min() <= 1
        for workers in (0, 2):
            for world in (1, 2):
                got = np.load(tmp_path / f"blocked-w{workers}-p{probe_samples}-world{world}.npz")
                for key in ("ids", "labels", "features"):
                    assert np.array_equal(got[key], reference[key]), f"w{workers} world{world} {key}"
    older_got, reference = (np.load(tmp_path / f) for f in ("older-w2-p44-world2.npz", "blocked-w0-p44-world1.npz"))
    assert all(np.array_equal(older_got[key], reference[key]) for key in ("ids", "labels", "features"))
