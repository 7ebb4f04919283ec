"""A rank ends when its launcher dies.

torchrun starts every rank in a session of its own, so a launcher that is killed outright (SIGKILL, the OOM killer, a
scheduler's clean-up) leaves its ranks running on, holding devices and writing into the run directory. Under a
launcher (torchrun / `python -m torch.distributed.run`, or the deepspeed launcher) a daemon thread polls the parent
process id: once the launcher is gone the rank has been re-parented, and it exits. A polling thread rather than
`prctl(PR_SET_PDEATHSIG)`: the death signal follows the parent *thread* that started the process, and is Linux-only.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from dlscale.distributed import under_launcher

log = logging.getLogger(__name__)
POLL_S = 0.5
EXIT_CODE = 143   # as if terminated by SIGTERM
_watched: int | None = None   # the launcher this process watches (one thread per process)


def exit_with_launcher(rank: int, poll_s: float = POLL_S) -> bool:
    """Under a launcher, make sure this process exits when the launcher does (once per process; logged); returns
    whether it is watched. Elsewhere (a plain `python` run, SLURM's srun, Ray) nothing is done: their parents are
    not launchers that leave ranks behind, and a run under `nohup` must outlive its shell."""
    global _watched
    if not under_launcher():
        return False
    if _watched is not None:
        return True
    parent = os.getppid()
    if parent == 1:
        _stop(rank, "its launcher exited before the rank started")
    _watched = parent
    threading.Thread(target=_watch, args=(parent, rank, poll_s), name="launcher-watchdog", daemon=True).start()
    log.info("rank %d (pid %d) exits when its launcher (pid %d) exits", rank, os.getpid(), parent)
    return True


def _watch(parent: int, rank: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    _stop(rank, f"its launcher (pid {parent}) exited")


def _stop(rank: int, why: str) -> None:
    log.error("rank %d (pid %d) stops: %s", rank, os.getpid(), why)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:   # a closed stream must not keep the orphan alive
            pass
    os._exit(EXIT_CODE)
