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


# ---- Training fixtures (tests/test_train.py, tests/test_train_dist.py) --------------------------------------------
# A toy dataset that any working training stage separates, and real launches (torchrun, deepspeed) as subprocesses.
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

# what the launchers set for their workers; a leftover value (an earlier in-process run sets them) must not leak
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def separable_image(rng: np.random.Generator, label: int, side: int) -> np.ndarray:
    """(1, side, side) float32: dim noise in [0, 0.2) plus a centred bright square whose size encodes the class
    (side/4, side/2, 3 side/4). Separable after any per-image normalisation and unchanged by flips/rotations."""
    x = rng.random((1, side, side), dtype=np.float32) * 0.2
    half = side * (label + 1) // 8
    x[:, side // 2 - half:side // 2 + half, side // 2 - half:side // 2 + half] += 1.0
    return x


@pytest.fixture(scope="session")
def make_separable(tmp_path_factory):
    """`make_separable(train=240, val=61, side=32, overflow=None)` -> a dataset directory of `separable_image`s in
    shards of 50 (records of 8), so splits end in short shards and records. Metadata holds `theta_E` (arcsec),
    which follows the class. `overflow=i` multiplies train sample i by 1e30: its squared error overflows float32.
    Datasets are written once per argument set and shared by the session."""
    from dlscale.data.shards import DatasetWriter
    made: dict[tuple, Path] = {}

    def make(train: int = 240, val: int = 61, side: int = 32, overflow: int | None = None) -> Path:
        key = (train, val, side, overflow)
        if key not in made:
            out = tmp_path_factory.mktemp("separable") / "data"
            rng = np.random.default_rng(1)
            with DatasetWriter(out, (1, side, side), {"kind": "test"}, shard_size=50, samples_per_record=8) as w:
                for split, n in (("train", train), ("val", val)):
                    for i in range(n):
                        label = i % len(CLASSES)
                        img = separable_image(rng, label, side)
                        if split == "train" and i == overflow:
                            img *= np.float32(1e30)
                        w.add(split, img, label, {"class": CLASSES[label], "source_file": f"{split}/{i}",
                                                  "theta_E": 0.5 + 0.3 * label + 0.05 * float(rng.standard_normal())})
            made[key] = out
        return made[key]
    return make


@pytest.fixture(scope="session")
def separable_data(make_separable) -> Path:
    """The default toy dataset: 240 train / 61 val images of 1x32x32, three classes."""
    return make_separable()


@pytest.fixture(scope="session")
def free_ports():
    """`free_ports(n)` -> n distinct free TCP ports on 127.0.0.1 for launchers' rendezvous, drawn below the kernel's
    ephemeral range (32768+), so connections that other processes open meanwhile cannot take them first."""
    import random
    import socket

    def pick(n: int) -> list[int]:
        ports: list[int] = []
        while len(ports) < n:
            port = random.randrange(20000, 32000)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            if port not in ports and port != 29500:   # 29500: the launchers' default, maybe in use by a user
                ports.append(port)
        return ports
    return pick


class Launch:
    """A command (a launcher and its ranks) in its own process group, output in `log`; `wait` kills it on timeout."""

    def __init__(self, argv: list, log: Path, cwd: Path, env: dict | None = None):
        extra, env = env or {}, {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
        env.update(DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
        self.argv, self.log = [str(a) for a in argv], log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the launcher's group and to every process under it (torchrun starts each rank in a session of
        its own)."""
        if self.proc.poll() is None:   # the group is ours only while its leader lives (after that its id may be reused)
            for pid in descendants(self.proc.pid):
                send(pid, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            tail, stacks = self.output()[-3000:], self.stacks()
            self.kill()
            report = (f"{' '.join(self.argv[:4])} ... still running after {timeout} s; output ends:\n{tail}\n"
                      f"---- the stacks of its processes (SIGUSR2) ----\n{stacks}")
            record_hang(report)
            raise AssertionError(report) from None

    def stacks(self) -> str:
        """What the processes under the launcher (dlscale's ranks and their DataLoader workers) write to the log on
        `STACKS_SIGNAL`: where each thread waits."""
        from dlscale.distributed import STACKS_SIGNAL
        before = self.log.stat().st_size
        for pid in descendants(self.proc.pid):   # one at a time: their dumps would interleave in the log
            send(pid, STACKS_SIGNAL)
            time.sleep(STACKS_WAIT_S)
        with open(self.log, "rb") as log:
            log.seek(before)
            return log.read().decode(errors="replace")


STACKS_WAIT_S = 0.3   # a process writes its stacks at once (in the signal handler, without the GIL)


# ---- processes as /proc shows them (Linux) ------------------------------------------------------------------------

def parents() -> dict[int, int]:
    """{pid: its parent's pid} of every process now."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:   # gone meanwhile
            continue
    return found


def children(pid: int) -> list[int]:
    return [child for child, parent in parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    """The processes under `pid`: its children, theirs, ..."""
    under: dict[int, list[int]] = {}
    for child, parent in parents().items():
        under.setdefault(parent, []).append(child)
    found, todo = [], list(under.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo.extend(under.get(found[-1], []))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")   # a zombie has exited (its new parent may never reap it)


def send(pid: int, signum: int) -> None:
    """`os.kill`, for a process that may have exited meanwhile."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ---- hung launches: their stacks, last in the session's output (where the tail of a CI log shows them) -----------

HANGS = "DLSCALE_TEST_HANGS"   # the directory of the reports, made by the session's controller for its workers


def record_hang(report: str) -> None:
    folder = os.environ.get(HANGS)
    if folder and Path(folder).is_dir():
        (Path(folder) / f"{os.getpid()}-{time.monotonic_ns()}.txt").write_text(report)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):    # the controller (pytest-xdist's workers inherit the variable)
        os.environ[HANGS] = tempfile.mkdtemp(prefix="dlscale-hangs-")


def pytest_unconfigure(config):
    if hasattr(config, "workerinput") or not os.environ.get(HANGS):
        return
    folder = Path(os.environ.pop(HANGS))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for report in sorted(folder.glob("*.txt")) if reporter is not None else []:
        reporter.write_sep("=", "a launch that hung (also in its test's error above)")
        reporter.write_line(report.read_text())
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def launch():
    """`launch(argv, log, cwd, env=None)` starts a `Launch` (`env`: extra environment variables); any still running
    at the end of the session are killed."""
    started: list[Launch] = []

    def start(argv: list, log: Path, cwd: Path, env: dict | None = None) -> Launch:
        started.append(Launch(argv, log, cwd, env))
        return started[-1]
    yield start
    for launched in started:
        launched.kill()


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """Directory of this interpreter's console scripts (torchrun, deepspeed)."""
    return Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    """Training overrides that keep a CPU test run to seconds: small encoder, 16-image batches, no workers."""
    return ["--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=16", "--data.num_workers=0",
            "--data.shuffle_buffer=64", "--schedule.log_every=5", "--eval.n_bootstrap=20", "--eval.probe_samples=96"]


# ---- the `slow` marker (setup.cfg): `pytest -m "not slow"` is the quick run, `make test` runs everything ----------

MULTI_PROCESS_FIXTURES = {"launch", "venv_bin"}   # torchrun / launcher processes, or the venv's console scripts


def pytest_collection_modifyitems(config, items):
    """A test that starts processes through `launch` or the venv's scripts (directly or through a fixture) is
    multi-process, hence `slow`; files that are long as a whole mark themselves (`pytestmark`)."""
    for item in items:
        if MULTI_PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
