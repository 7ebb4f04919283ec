"""Evaluation is a pure function of (weights, data, split, config); the training stream of a seed does not depend on
the number of DataLoader workers.

The configurations users run, not the convenient one: DataLoader workers 0, 1, 2 and 4 (the default is 2, the GPU
launch files use 8), world size 1 and 2, an eval split with fewer shards than ranks x workers, repeated runs, and
processes started with different PYTHONHASHSEED. Records of 256 stacked 64x64 images are used where the defect of
v2 showed (a worker normalised rows of a record in place while an earlier batch, a view of the same storage, was
still being moved to shared memory: some images reached the model unnormalised).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dlscale.data.classes import CLASSES
from dlscale.data.shards import DatasetWriter
from dlscale.data.stream import StreamConfig, eval_loader, leading_shards, train_loader

pytestmark = pytest.mark.slow   # eval and transfer in many processes (workers x ranks x hash seeds): minutes

WORKERS = (0, 1, 2, 4)


@pytest.fixture(scope="module")
def big_records(tmp_path_factory) -> Path:
    """2,048 val and 1,024 train images of 1x64x64 in records of 256, shards of 512; raw values up to ~150."""
    out = tmp_path_factory.mktemp("determinism") / "data"
    rng = np.random.default_rng(0)
    with DatasetWriter(out, (1, 64, 64), {"kind": "test"}, 512, 256, 0) as writer:
        for split, n in {"train": 1024, "val": 2048}.items():
            for i in range(n):
                label = i % len(CLASSES)
                img = (rng.random((1, 64, 64), dtype=np.float32) * (50 + 50 * label)).astype(np.float32)
                writer.add(split, img, label, {"class": CLASSES[label], "source_file": f"{split}/{i}",
                                               "theta_E": float(img.mean())})
    return out


def _eval_batches(data_dir, workers: int, split: str = "val", batch_size: int = 32,
                  **options) -> list[tuple[list, torch.Tensor]]:
    cfg = StreamConfig(batch_size=batch_size, num_workers=workers)
    return [(b["ids"].tolist(), b["image"].clone()) for b in eval_loader(data_dir, cfg, split=split, **options)]


def _by_id(batches) -> dict[tuple, torch.Tensor]:
    return {tuple(i): image for ids, images in batches for i, image in zip(ids, images)}


def test_eval_images_are_bitwise_equal_for_any_worker_count_and_repeat(big_records):
    reference = _by_id(_eval_batches(big_records, 0))
    assert len(reference) == 2048
    assert max(float(x.max()) for x in reference.values()) <= 1.0       # minmax-normalised, every one
    for workers in WORKERS[1:]:
        for repeat in range(3):
            seen = _by_id(_eval_batches(big_records, workers))
            assert seen.keys() == reference.keys()
            differing = [k for k in reference if not torch.equal(seen[k], reference[k])]
            assert not differing, f"{workers} workers, run {repeat}: {len(differing)} images differ, e.g. " \
                                  f"{differing[:3]} (largest value {max(float(seen[k].max()) for k in differing)})"


def test_eval_batches_hold_the_same_images_whatever_the_workers_and_ranks(big_records):
    """Batches are cut per shard: which images share a batch does not depend on how shards are dealt out. A batch of
    48 does not divide a shard of 512, so a stream that carried a shard's rest into the next shard's batch would
    group images differently with another number of workers or ranks."""
    def groups(batches):
        return sorted(tuple(map(tuple, ids)) for ids, _ in batches)
    reference = groups(_eval_batches(big_records, 0, batch_size=48))
    assert {len(g) for g in reference} == {48, 512 % 48}
    for workers in (2, 4):
        assert groups(_eval_batches(big_records, workers, batch_size=48)) == reference
    cfg = StreamConfig(batch_size=48, num_workers=2)
    per_rank = [[tuple(map(tuple, b["ids"].tolist())) for b in eval_loader(big_records, cfg, rank, 3)]
                for rank in range(3)]   # 3 ranks x 2 workers = 6 slots for 4 val shards: two slots get none
    assert sorted(g for rank in per_rank for g in rank) == reference


def test_leading_shards_hold_the_probe_samples_in_id_order(big_records):
    from dlscale.data.shards import load_manifest
    shards = load_manifest(big_records)["splits"]["train"]["shards"]
    assert leading_shards(shards, 1) == 1 and leading_shards(shards, 512) == 1 and leading_shards(shards, 513) == 2
    assert leading_shards(shards, 10**6) == len(shards)
    for workers in (0, 2):
        ids = sorted(tuple(i) for ids, _ in _eval_batches(big_records, workers, "train", shard_limit=1) for i in ids)
        assert len(ids) == 512 and {i[0] for i in ids} == {0}


def _train_batches(data_dir, workers: int, seed: int = 3) -> list[dict]:
    cfg = StreamConfig(batch_size=32, num_workers=workers, shuffle_buffer=256)
    return list(train_loader(data_dir, cfg, seed=seed, batches=20))


def test_training_stream_of_a_seed_gives_the_same_batches_for_any_worker_count(big_records):
    reference = _train_batches(big_records, 0)
    assert len({tuple(b["ids"][:, 0].tolist()) for b in reference}) > 1      # shuffled across shards
    for workers in WORKERS[1:]:
        batches = _train_batches(big_records, workers)
        assert len(batches) == len(reference)
        for k, (a, b) in enumerate(zip(reference, batches)):
            assert torch.equal(a["ids"], b["ids"]), f"{workers} workers: batch {k} holds other samples"
            assert torch.equal(a["image"], b["image"]), f"{workers} workers: batch {k} transformed otherwise"
    other_seed = _train_batches(big_records, 2, seed=4)
    assert not torch.equal(other_seed[0]["ids"], reference[0]["ids"])


# ---- whole commands in processes of their own: dlscale eval (1 and 2 ranks) and dlscale transfer ---------------

def _env(hash_seed: int) -> dict:
    from conftest import RANK_VARIABLES
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(PYTHONHASHSEED=str(hash_seed), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return env


def _run(argv: list, hash_seed: int, cwd: Path, timeout: int = 300) -> str:
    done = subprocess.run([str(a) for a in argv], env=_env(hash_seed), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, argv[:4]))} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, big_records, tiny_args) -> Path:
    from test_transfer import train
    run = tmp_path_factory.mktemp("determinism_run") / "run"
    return train("supervised", big_records, run, *tiny_args, "--schedule.epochs=1", "--schedule.batches_per_epoch=4",
                 "--eval.probe_samples=600")


def _run_copy(trained_run: Path, where: Path, workers: int) -> Path:
    """A copy of the finished run whose config.yaml reads with `workers` DataLoader workers."""
    copy = where / f"run_w{workers}"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["num_workers"] = workers
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


def _evaluated(run: Path) -> tuple[dict, dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    with np.load(run / "scores_val.npz") as npz:
        scores = {k: npz[k] for k in npz.files}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, list))}, scores


def test_dlscale_eval_is_bitwise_equal_across_workers_ranks_hash_seeds_and_repeats(trained_run, tmp_path,
                                                                                      venv_bin, free_ports):
    dlscale = venv_bin / "dlscale"
    results = {}
    for workers, ranks, hash_seed in [(0, 1, 0), (2, 1, 1), (2, 1, 2), (4, 1, 3), (4, 2, 4)]:
        run = _run_copy(trained_run, tmp_path / f"r{ranks}_s{hash_seed}", workers)
        if ranks == 1:
            _run([dlscale, "eval", "--run-dir", run], hash_seed, tmp_path)
        else:   # 2 ranks x 4 workers = 8 slots for 4 val shards and the probe's 2 train shards
            port = free_ports(1)[0]
            _run([venv_bin / "torchrun", "--nnodes=1", "--nproc_per_node=2", f"--master_port={port}",
                  "--master_addr=127.0.0.1", "-m", "dlscale.cli", "eval", "--run-dir", run], hash_seed, tmp_path)
        results[(workers, ranks, hash_seed)] = _evaluated(run)
    (ref_metrics, ref_scores), *_ = results.values()
    assert ref_metrics["val/n_samples"] == 2048 and "probe/accuracy" in ref_metrics
    for key, (metrics, scores) in results.items():
        assert metrics == ref_metrics, f"workers, ranks, hash seed = {key}: metrics differ"
        assert scores.keys() == ref_scores.keys()
        for name in scores:
            assert np.array_equal(scores[name], ref_scores[name]), f"{key}: scores_val.npz[{name!r}] differs"


def test_dlscale_transfer_results_are_equal_across_workers_and_hash_seeds(trained_run, big_records, tmp_path,
                                                                         venv_bin):
    outcomes = []
    for workers, hash_seed in [(0, 11), (2, 12)]:
        out = tmp_path / f"transfer_w{workers}"
        _run([venv_bin / "dlscale", "transfer", "--encoder", trained_run, "--data", big_records, "--out", out,
              "--labels-per-class", "10,100", "--repeats", "2", "--methods", "probe,random", "--n-bootstrap", "50",
              "--tasks", "classification,regression,anomaly",
              f"--data.num_workers={workers}", "--data.batch_size=64"], hash_seed, tmp_path)
        outcomes.append(json.loads((out / "results.json").read_text()))
    cells = outcomes[0]["cells"]
    assert len([c for c in cells if c["task"] == "classification"]) == 4   # probe and random at 10 and 100 per class
    assert {c["task"] for c in cells} == {"classification", "regression", "anomaly"}
    configs = [o.pop("config") for o in outcomes]
    assert [(c["data"]["num_workers"], c["data"]["batch_size"]) for c in configs] == [(0, 64), (2, 64)]
    assert [c.pop("out") for c in configs] == [str(tmp_path / f"transfer_w{w}") for w in (0, 2)]
    for c in configs:
        c["data"].pop("num_workers")
    assert configs[0] == configs[1]                  # the studies differ only in their workers and output folder
    assert all(set(o.pop("seconds")) == {"classification", "regression", "anomaly"} for o in outcomes)   # wall time
    assert outcomes[0] == outcomes[1]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_two_rank_run_reports_what_dlscale_eval_of_its_model_gives(big_records, tmp_path, venv_bin, free_ports,
                                                                      tiny_args):
    """On CPU each rank keeps its own BatchNorm statistics: the final evaluation of a 2-rank run scores every rank's
    share with rank 0's (the exported model's), so its metrics are those of `dlscale eval` on 1 rank."""
    run = tmp_path / "run2"
    port = free_ports(1)[0]
    args = [a for a in tiny_args if not a.startswith("--data.num_workers")]
    _run([venv_bin / "torchrun", "--nnodes=1", "--nproc_per_node=2", f"--master_port={port}",
          "--master_addr=127.0.0.1", "-m", "dlscale.cli", "train", "--stage", "supervised", "--data", big_records,
          "--run-dir", run, *args, "--data.num_workers=1", "--schedule.epochs=1", "--schedule.batches_per_epoch=4",
          "--eval.probe_samples=600"], 0, tmp_path)
    trained, trained_scores = _evaluated(run)
    _run([venv_bin / "dlscale", "eval", "--run-dir", run], 1, tmp_path)
    evaluated, evaluated_scores = _evaluated(run)
    for key in [k for k in evaluated if k.startswith(("val/", "probe/"))]:
        assert trained[key] == evaluated[key], key
    for name in evaluated_scores:
        assert np.array_equal(trained_scores[name], evaluated_scores[name]), name
