"""Preemption: the stop signal of a cluster (SLURM, Kubernetes, spot instances: SIGTERM, or the one SLURM's
`--signal` names) makes a training run write a checkpoint and exit with `PREEMPTED_EXIT_CODE`, instead of dying
with everything since its last checkpoint lost.

The handler only records the signal: nothing else is safe inside one (the main thread may be anywhere, in a
collective or half-way through a checkpoint write). The trainer looks at the record at every logging interval, where
the ranks agree on it in the all-reduce they make there anyway (`Trainer.sync`; `agree` before a run starts), so
whichever rank got the signal, every rank stops after the same step, one complete checkpoint is written, and every
rank exits with the same code. Further signals are absorbed:
launchers and SLURM often deliver one per level (torchrun forwards its own SIGTERM to ranks SLURM signalled
already). Only SIGKILL at the end of the grace period cuts the save short; the complete-marker scheme of
`dlscale.train.checkpoint` then leaves the previous complete checkpoint as the one `--resume auto` uses.

Once a stop was requested the process is meant to exit: when the run ends the signals are ignored (SIG_IGN, which,
unlike a Python handler, outlasts the interpreter's shutdown) until it does, so a launcher's follow-up SIGTERM (torchrun
sends one to the ranks still alive once one rank has exited) cannot turn the exit code into -15 while a rank is
still tearing down; and a later `run` in the same process (a transfer plan, the quickstart) stops before it starts.

Handlers can only be installed from the main thread; a run in another thread (Ray Tune's function trials) keeps
its host's signal handling. A Tune scheduler stops such trials only at a report, and the trainer writes its
checkpoint before every report, so a stopped trial still has a complete checkpoint of its last evaluated epoch.

Drill (also what the tests use): `DLSCALE_SIGNAL_AT_STEP=STEP[:SIGNAL[:RANK|launcher]]` makes rank RANK (default 0)
send SIGNAL (default SIGTERM) to itself right after optimizer step STEP, or, with `launcher`, makes rank 0 send it
to its launcher (torchrun, the deepspeed launcher) and wait for the launcher to forward it: the whole path of a real
preemption, at a known step. SIGKILL (rank targets only) kills the rank outright right after that step, before a
checkpoint of it: the tests' crash at a known step, with the run's previous complete checkpoint to resume from.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dlscale.distributed import DRILL, drill_request, under_launcher

log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL (sysexits.h): stopped on request with a complete checkpoint; resume it
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
UNCATCHABLE = ("SIGKILL", "SIGSTOP")
DRILL_WAIT_S = 60.0   # how long a drill waits for its launcher to forward the signal

_signum = 0                      # the stop signal this process received or its ranks agreed on (0: none)
_previous: dict[int, Any] = {}   # handlers `listen` replaced: put back when it ends without a stop, or by `clear`


class Preempted(Exception):
    """The run stopped on a signal after writing a complete checkpoint (or before it wrote anything). Entry points
    turn it into `PREEMPTED_EXIT_CODE`; the message says which signal, where, and how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = PREEMPTED_EXIT_CODE


def signal_number(name: str, drill: bool = False) -> int:
    """The number of a catchable signal named like `SIGTERM`; anything else raises naming it. With `drill`, SIGKILL
    is accepted too (a drill can send it; no handler can catch it)."""
    number = getattr(signal.Signals, str(name), None) if str(name).startswith("SIG") else None
    if number is None or (name in UNCATCHABLE and not (drill and name == "SIGKILL")):
        raise ValueError(f"{name!r} is not a signal a process can catch (give names such as SIGTERM, SIGUSR1)")
    return int(number)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int:
    """The stop signal this process received, or learned of from another rank (0: none)."""
    return _signum


def _record(signum: int, frame) -> None:
    """The handler: remember the first signal (later ones are absorbed). Nothing else (see the module docstring)."""
    global _signum
    _signum = _signum or signum


@contextlib.contextmanager
def listen(names: list[str] | tuple[str, ...]) -> Iterator[bool]:
    """Record the signals `names` while the block runs (yields whether handlers were installed: not outside the main
    thread, not for an empty list). Without a stop request the previous handlers come back at the end; after one
    the signals are ignored from then on (`clear` undoes it)."""
    if not names or threading.current_thread() is not threading.main_thread():
        if names:
            log.debug("not in the main thread: %s keep the host's handling (no checkpoint on them)", ", ".join(names))
        yield False
        return
    for number in [signal_number(n) for n in names]:
        previous = signal.signal(number, _record)
        _previous.setdefault(number, previous)
    try:
        yield True
    finally:
        if _signum:   # the process is on its way out
            for number in _previous:
                signal.signal(number, signal.SIG_IGN)
        else:
            _restore()


def _restore() -> None:
    for number, handler in _previous.items():
        signal.signal(number, handler)
    _previous.clear()


def clear() -> None:
    """Forget a stop request and put the original handlers back (for a caller that carries on in this process
    after catching `Preempted`, e.g. a test)."""
    global _signum
    _signum = 0
    _restore()


def adopt(signum: int) -> None:
    """Record a stop signal another rank received, agreed in a collective: this rank stops, and exits, as if it had
    received it."""
    global _signum
    _signum = _signum or signum


def agree(world: int, device) -> int:
    """The stop signal any rank received (0: none), the same on every rank: one MAX all-reduce (a host sync), none
    in a world of one. Every rank must call it at the same point. A rank that learns of the stop here records it as
    its own (it stops, and exits, like the rank that got the signal)."""
    if world == 1:
        return _signum
    import torch
    import torch.distributed as dist
    flag = torch.tensor([_signum], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    adopt(int(flag.item()))
    return int(flag.item())


# ---- the drill --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Drill:
    step: int
    signum: int
    target: str   # a rank number, or "launcher"


def drill_from_env(env: dict | None = None) -> Drill | None:
    """The drill `DLSCALE_SIGNAL_AT_STEP` asks for (None: none); a malformed value raises naming the variable."""
    value = drill_request(env)
    if not value:
        return None
    parts = value.split(":")
    try:
        if len(parts) > 3:
            raise ValueError("too many parts")
        step = int(parts[0])
        signum = signal_number(parts[1] if len(parts) > 1 and parts[1] else "SIGTERM", drill=True)
        target = parts[2] if len(parts) > 2 and parts[2] else "0"
        if target != "launcher" and not target.isdigit():
            raise ValueError(f"target {target!r} is neither a rank number nor 'launcher'")
        if target == "launcher" and signum == signal.SIGKILL:
            raise ValueError("SIGKILL goes to a rank only (a launcher killed outright forwards nothing)")
    except ValueError as err:
        raise ValueError(f"{DRILL}={value!r}: expected STEP[:SIGNAL[:RANK|launcher]], e.g. 12:SIGTERM:1 ({err})") \
            from None
    if target == "launcher":
        if not under_launcher():
            raise ValueError(f"{DRILL}={value!r}: this process has no launcher (torchrun, deepspeed) to signal")
    return Drill(step, signum, target)


def run_drill(drill: Drill, step: int, rank: int) -> None:
    """Deliver the drill's signal (every rank calls this after the drill's step; the drill's rank sends it and
    waits until it has arrived here)."""
    to_launcher = drill.target == "launcher"
    if rank != (0 if to_launcher else int(drill.target)):
        return
    pid = os.getppid() if to_launcher else os.getpid()
    log.info("drill: rank %d sends %s to %s (pid %d) after step %d", rank, signal_name(drill.signum),
             "its launcher" if to_launcher else "itself", pid, step)
    os.kill(pid, drill.signum)
    deadline = time.monotonic() + DRILL_WAIT_S
    while not _signum and time.monotonic() < deadline:   # until it arrives here (forwarded by the launcher)
        time.sleep(0.01)
