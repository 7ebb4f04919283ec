"""`dlscale simulate`: batch planning (rounds of one batch per class, splits in order), an optional CPU worker pool,
and writing every round through `DatasetWriter` into a new shard dataset, its classes spread over the shards
(`dlscale.data.mixing`: a batch holds one class, so written as it comes it would fill shards with one class).

`simulate(config, n_per_class, out, ...)` is the library function (typed arguments: a `SimulatorConfig`, the split
fractions as a mapping); `simulate_main` is the command line, which only parses argv into that call."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import typing
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from dlscale.configtree import plain
from dlscale.data.classes import CLASSES, SPLITS
from dlscale.data.mixing import add_round
from dlscale.data.shards import DatasetWriter
from dlscale.sim.config import PRESETS, SimulatorConfig, load_config
from dlscale.sim.simulator import LensSimulator

log = logging.getLogger(__name__)



def parse_splits(text: str) -> dict[str, float]:
    """'train=0.9,val=0.1' -> {'train': 0.9, 'val': 0.1}; fractions > 0 summing to 1."""
    splits: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in SPLITS or name in splits:
            raise ValueError(f"--splits {text!r}: split {name!r} unknown or repeated; expected names from {SPLITS}")
        try:
            splits[name] = float(value)
        except ValueError:
            raise ValueError(f"--splits {text!r}: {value!r} is not a fraction") from None
        if not 0 < splits[name] <= 1:
            raise ValueError(f"--splits {text!r}: fraction of {name} must be in (0, 1]")
    if abs(sum(splits.values()) - 1) > 1e-6:
        raise ValueError(f"--splits {text!r}: fractions sum to {sum(splits.values())}, expected 1")
    return splits


def split_counts(n_per_class: int, splits: dict[str, float]) -> dict[str, int]:
    """Images per class in each split; rounding goes to the first split."""
    counts = {name: int(round(n_per_class * frac)) for name, frac in splits.items()}
    first = next(iter(counts))
    counts[first] = n_per_class - sum(c for name, c in counts.items() if name != first)
    if counts[first] < 0:
        raise ValueError(f"--splits {splits}: does not divide {n_per_class} images per class")
    return counts


def simulate_main(argv: list[str] | None = None) -> int:
    """`dlscale simulate`: simulate `--n-per-class` images of every class into a new shard dataset (argv parsed
    into `simulate`)."""
    p = argparse.ArgumentParser(prog="dlscale simulate", allow_abbrev=False,
                                description="Simulate lensing images (no_sub, cdm, axion) into WebDataset shards. "
                                            "Any config field can be set with --section.field=value, "
                                            "e.g. --lens.randomize=true; --print-config lists them.")
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (or `preset:` in --config)")
    p.add_argument("--n-per-class", type=int, help="images per class, all splits together (required)")
    p.add_argument("--out", type=Path, help="new dataset directory (required)")
    p.add_argument("--splits", default="train=0.9,val=0.1", help="fractions per split, e.g. train=0.8,val=0.1,test=0.1")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="simulation precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="images per batch (default 32 on CPU, 1024 on a GPU)")
    p.add_argument("--workers", type=int, default=1, help="CPU: simulating processes of one thread each (the same "
                                                          "images whatever the number); 1 = this process")
    p.add_argument("--shard-size", type=int, default=2048, help="samples per shard")
    p.add_argument("--samples-per-record", type=int, default=256, help="1 = classic one-sample WebDataset records")
    p.add_argument("--config", type=Path, help="YAML with config sections (instrument, lens, source, ...)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    args, extra = p.parse_known_args(argv)

    config = load_config(args.preset, args.config, extra)
    if args.print_config:
        print(yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False), end="")
        return 0
    if args.n_per_class is None or args.n_per_class < 1:
        raise ValueError(f"--n-per-class = {args.n_per_class}: expected an integer >= 1")
    if args.out is None:
        raise ValueError("--out: required (a new dataset directory)")
    simulate(config, args.n_per_class, args.out, parse_splits(args.splits), device=args.device, dtype=args.dtype,
             seed=args.seed, batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
             samples_per_record=args.samples_per_record)
    return 0


def simulate(config: SimulatorConfig, n_per_class: int, out: Path | str, splits: dict[str, float] | None = None,
             device: str = "auto", dtype: str = "float32", seed: int = 0, batch_size: int | None = None,
             workers: int = 1, shard_size: int = 2048, samples_per_record: int = 256) -> Path:
    """Simulate `n_per_class` images of every class with `config` (validated) into the new shard dataset `out`,
    split by the fractions `splits` (default train 0.9, val 0.1; rounding goes to the first split). `batch_size`:
    images per batch (default 32 on CPU, 1024 on a GPU); `workers` > 1: CPU processes of one thread each (the same
    images whatever the number). Returns `out`."""

    out = Path(out)
    config = config.validate()
    if n_per_class < 1:
        raise ValueError(f"--n-per-class = {n_per_class}: expected an integer >= 1")
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} = {value}: expected an integer >= 1")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype {dtype!r}: expected float32 or float64")
    splits = dict(splits) if splits is not None else {"train": 0.9, "val": 0.1}
    check_splits(splits)
    counts = split_counts(n_per_class, splits)
    sim = LensSimulator(config, device, getattr(torch, dtype))
    if workers > 1 and sim.device.type == "cuda":
        raise ValueError("--workers: CPU only; one process drives a GPU (use a larger --batch-size)")
    batch_size = batch_size or (1024 if sim.device.type == "cuda" else 32)
    n = config.instrument.n_pix
    source = {"kind": "simulator", "preset": config.preset, "config": plain(dataclasses.asdict(config)),
              "seed": seed, "n_per_class": n_per_class, "splits": counts, "batch_size": batch_size,
              "device": sim.device.type, "dtype": dtype}
    writer = DatasetWriter(out, (1, n, n), source, shard_size=shard_size, samples_per_record=samples_per_record,
                           seed=seed)
    jobs = list(enumerate(plan_batches(counts, batch_size)))
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (config, dtype, seed))
    try:
        results = pool.imap(_worker_batch, jobs) if pool else (_simulate_batch(sim, seed, job) for job in jobs)
        with writer, tqdm(total=len(CLASSES) * n_per_class, unit="img", desc="simulate") as bar:
            done = zip(jobs, results)
            for batches in zip(*[done] * len(CLASSES)):    # a round: one batch of each class, the same pieces
                labelled = []
                for (index, (class_name, pieces)), (images, metas) in batches:
                    check_batch(images, class_name, index, config, dtype)
                    labelled.append((images, np.full(len(images), CLASSES.index(class_name), dtype=np.int64), metas))
                    bar.update(len(images))
                add_round(writer, pieces, labelled)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    log.info("wrote %s: %s per class", out, ", ".join(f"{s} {c}" for s, c in counts.items()))
    return out


def check_splits(splits: dict[str, float]) -> None:
    """Split names from SPLITS, fractions in (0, 1] summing to 1 (what `parse_splits` checks of its text)."""
    text = ",".join(f"{k}={v}" for k, v in splits.items())
    for name, value in splits.items():
        if name not in SPLITS:
            raise ValueError(f"--splits {text!r}: split {name!r} unknown; expected names from {SPLITS}")
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"--splits {text!r}: fraction of {name} must be in (0, 1]")
    if abs(sum(splits.values()) - 1) > 1e-6:
        raise ValueError(f"--splits {text!r}: fractions sum to {sum(splits.values())}, expected 1")


# what decides how bright and how strongly lensed an image is: named when a batch comes out non-finite
BRIGHTNESS_KEYS = ("source.magnitude", "source.amplitude", "instrument.zero_point", "source.R_sersic",
                   "source.n_sersic", "instrument.exposure_time", "instrument.pixel_scale", "instrument.output_counts",
                   "lens.theta_E", "lens.randomize", "lens.theta_E_range")


def check_batch(images: np.ndarray, class_name: str, index: int, config: SimulatorConfig, dtype: str) -> None:
    """Refuse a batch with NaN/Inf pixels (or negative counts: a Poisson draw past int64) before it is written,
    naming the class, the batch and the config values that set the image scale. `validate_config` keeps every
    single value in range; this catches the combinations that still overflow."""
    bad = int(np.count_nonzero(~np.isfinite(images)))
    negative = int(np.count_nonzero(images < 0)) if config.instrument.output_counts else 0
    if bad or negative:
        values = ", ".join(f"{key}={getattr(getattr(config, key.split('.')[0]), key.split('.')[1])!r}"
                           for key in BRIGHTNESS_KEYS)
        what = f"{bad} NaN/Inf pixels" if bad else f"{negative} negative counts (a Poisson draw beyond int64)"
        raise ValueError(f"class {class_name}, batch {index}: {what} of {images.size} pixels in {dtype}; "
                         f"check {values}; nothing was written")


def _simulate_batch(sim: LensSimulator, seed: int, job: tuple[int, tuple[str, list[tuple[str, int]]]]
                    ) -> tuple[np.ndarray, list[dict]]:
    index, (class_name, pieces) = job
    return sim.simulate(class_name, sum(k for _, k in pieces), *sim.generators(seed, index))


_worker: dict = {}      # the simulator of a --workers process, made once by _start_worker


def _start_worker(config: SimulatorConfig, dtype: str, seed: int) -> None:
    torch.set_num_threads(1)
    _worker.update(sim=LensSimulator(config, "cpu", getattr(torch, dtype)), seed=seed)


def _worker_batch(job: tuple[int, tuple[str, list[tuple[str, int]]]]) -> tuple[np.ndarray, list[dict]]:
    return _simulate_batch(_worker["sim"], _worker["seed"], job)


def plan_batches(counts: dict[str, int], batch_size: int) -> typing.Iterator[tuple[str, list[tuple[str, int]]]]:
    """Yield (class, [(split, count), ...]) batches in rounds of one batch per class, the batches of a round cut into
    the same pieces (what `add_round` mixes); each class's images fill the splits in order."""
    names, bounds = list(counts), np.cumsum(list(counts.values()))
    for start in range(0, int(bounds[-1]), batch_size):
        stop = min(start + batch_size, int(bounds[-1]))
        edges = [start, *(int(b) for b in bounds if start < b < stop), stop]
        pieces = [(names[int(np.searchsorted(bounds, a, side="right"))], b - a) for a, b in zip(edges, edges[1:])]
        for class_name in CLASSES:
            yield class_name, pieces
