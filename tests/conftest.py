"""Test-wide settings: one quiet torch thread per process (small shared CPU machines), CPU DeepSpeed."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(1)


# Shared data-layer fixtures: shard datasets written on the fly, a reader of their records, the CLI, a deadline.
import logging  # noqa: E402
import signal  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlscale.data.classes import CLASSES  # noqa: E402


class Sample(NamedTuple):
    image: np.ndarray
    label: int
    meta: dict
    id: tuple[int, int, int]    # (shard index, record index, position), as the streams report it in batch["ids"]


def read_split(data_dir: Path, split: str) -> list[Sample]:
    """Every sample of one split in on-disk order, decoded straight from the tars (no stream involved)."""
    from dlscale.data.shards import decode_record, load_manifest
    from dlscale.data.tario import iter_records
    manifest = load_manifest(data_dir)
    out = []
    for s, shard in enumerate(manifest["splits"][split]["shards"]):
        with open(Path(data_dir) / shard["name"], "rb") as f:
            for r, (key, record) in enumerate(iter_records(f, shard["name"])):
                images, labels, metas = decode_record(record, manifest["record_layout"], manifest["image_shape"],
                                                      len(manifest["classes"]), key)
                out += [Sample(np.array(image), int(label), meta, (s, r, p))
                        for p, (image, label, meta) in enumerate(zip(images, labels, metas))]
    return out


@pytest.fixture(scope="session")
def records():
    """`records(data_dir, split)` -> list of `Sample` read straight from the shards."""
    return read_split


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory):
    """Factory for small shard datasets in a fresh directory each call, written through `DatasetWriter`.

    `splits` maps split -> sample count; `shard_size` that does not divide a count leaves a small last shard, and
    `samples_per_record` that does not divide `shard_size` leaves a short last record in every shard. Images are
    random (no symmetry), their mean encodes the class, and metadata holds `theta_E` = the image mean.
    """
    from deeplense_fixtures import image
    from dlscale.data.shards import DatasetWriter

    def make(splits: dict[str, int], shard_size: int = 7, samples_per_record: int = 3,
             shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> Path:
        out = tmp_path_factory.mktemp("shards") / "data"
        rng = np.random.default_rng(seed)
        with DatasetWriter(out, shape, {"kind": "test"}, shard_size, samples_per_record, seed) as writer:
            for split, n in splits.items():
                for i in range(n):
                    label = i % len(CLASSES)
                    img = image(rng, CLASSES[label], shape, np.float32)
                    writer.add(split, img, label, {"class": CLASSES[label], "source_file": f"{split}/{i}",
                                                   "theta_E": float(img.mean())})
        return out
    return make


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """`cli(*argv)` runs `dlscale.cli.main` and returns its exit code, stdout and stderr (logs included).

    `main` installs its own log handlers on the root logger; they are removed again so later tests log normally.
    """
    from dlscale.cli import main
    root = logging.getLogger()

    def run(*argv) -> CliResult:
        handlers, level = root.handlers[:], root.level
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)
    return run


@pytest.fixture
def deadline():
    """`with deadline(seconds):` fails the test with TimeoutError instead of letting a hung loop block the run."""
    @contextmanager
    def limit(seconds: int):
        def expire(signum, frame):
            raise TimeoutError(f"still running after {seconds} s")
        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    return limit
