"""The one distributed module: who am I in the job (rank / world / local rank from torchrun, the deepspeed launcher,
SLURM or Ray), whether a launcher started this process, how local ranks are launched, and rank-0 logging.

This is the only module that reads or sets environment variables (`LAUNCHER_VARIABLES`: the rank layout;
`LAUNCHER_MARKERS`: set only for the ranks a launcher started; `DRILL`; what a process sets up for DeepSpeed and Ray:
`set_env`, `environment`) and the only library code that builds a command line:
`launch_local_ranks` starts `python -m torch.distributed.run ... -m MODULE --config RECORD` (a process boundary, so
an entry point; the typed config crosses it as a record file, and only that file's path is an argument).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info(local_rank_arg: int | None = None) -> DistInfo:
    """Rank layout of this process: an existing process group (e.g. Ray Train's), else the environment
    (torchrun / deepspeed set RANK etc.; SLURM sets SLURM_PROCID etc.), else a world of one."""
    import torch.distributed as dist
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, local_rank_arg or 0
    return DistInfo(rank, world, local)


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


LAUNCHER_MARKERS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK")   # set for its ranks by torchrun; by deepspeed's launch.py


def set_env(name: str, value: str, default_only: bool = False) -> None:
    """Set an environment variable of this process (its libraries read it: DS_ACCELERATOR, RAY_...); with
    `default_only`, only where the user has not."""
    if default_only:
        os.environ.setdefault(name, value)
    else:
        os.environ[name] = value


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set for the duration of the block, then restored (or removed)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


DRILL = "DLSCALE_SIGNAL_AT_STEP"   # a preemption drill: STEP[:SIGNAL[:RANK|launcher]] (`preemption.drill_from_env`)


def drill_request(env: dict | None = None) -> str:
    """The preemption drill this process is asked for ("" : none)."""
    return (os.environ if env is None else env).get(DRILL, "").strip()


def under_launcher(env: dict | None = None) -> bool:
    """Whether a launcher (torchrun / `python -m torch.distributed.run`, or the deepspeed launcher) started this
    process as one of its ranks (SLURM's srun, Ray or a plain `python` run are not such launchers)."""
    env = os.environ if env is None else env
    return any(name in env for name in LAUNCHER_MARKERS)


def local_ranks() -> int:
    """Data-parallel ranks for this machine: every GPU, or on CPU up to 2 one-thread processes (1.4-1.7x here)."""
    import torch
    gpus = torch.cuda.device_count()
    return gpus if gpus else min(2, os.cpu_count() or 1)


def local_rank_env(env: dict | None = None) -> dict:
    """The environment of a launch of local ranks: this process's, without its own rank layout (the ranks get
    theirs from the launcher: a parent started under SLURM or torchrun must not make them join its job), one
    OpenMP thread per rank unless set."""
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k not in LAUNCHER_VARIABLES + LAUNCHER_MARKERS}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch_local_ranks(module: str, record: str | Path, ranks: int, check: bool = True) -> int:
    """Run `python -m MODULE --config RECORD` on `ranks` local ranks through torchrun (standalone rendezvous) and
    wait; returns its exit code (raises CalledProcessError on failure with `check`). RECORD is the file that holds
    what the ranks run (a typed config written as YAML, a transfer plan as JSON): only its path crosses the process
    boundary, never config values. The one place the library builds a command line."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", module, "--config", str(record)]
    return subprocess.run(command, env=local_rank_env(), check=check).returncode


def forget_launcher() -> None:
    """Make this process a world of one whatever its parent was launched with: drop inherited rank variables (a Ray
    Tune trial of a sweep started under SLURM or torchrun, or after an in-process run exported them: concurrent
    trials would otherwise all join one job or all listen on one MASTER_PORT). A process group already started in
    this process (by an earlier run) is its world of one: its variables stay, DeepSpeed reads them when joining."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)


def export_env(info: DistInfo, master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
    """Fill the torch.distributed variables (for SLURM or single-process runs) so DeepSpeed/torch can rendezvous."""
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", master_addr))
    os.environ.setdefault("MASTER_PORT", str(master_port or _free_port()))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RankZeroFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


STACKS_SIGNAL = getattr(signal, "SIGUSR2", None)
"""`kill -USR2 PID`: a dlscale process (and each of its DataLoader workers, which inherit it) writes the Python
stack of every thread to its stderr and goes on: where a run that seems hung is waiting. (None where the platform
lacks the signal; a run that names it in `schedule.preempt_signals` stops on it instead.)"""


def setup_logging(rank: int = 0, log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Readable logs: rank 0 logs INFO, other ranks only warnings and errors (tagged with their rank); and
    `STACKS_SIGNAL` dumps the stacks."""
    if STACKS_SIGNAL is not None and sys.__stderr__ is not None:   # the process's stderr (fd 2), not a capture of it
        faulthandler.register(STACKS_SIGNAL, file=sys.__stderr__, all_threads=True)
    fmt = "%(asctime)s %(levelname).1s " + (f"[rank {rank}] " if rank else "") + "%(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        h.addFilter(_RankZeroFilter(rank))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.setLevel(level)
    for h in handlers:
        root.addHandler(h)
