"""The hidden ``.<name>.partial-<pid>`` directory a dataset is written into before it is renamed into place.

A run that dies normally removes its own; a run killed with SIGKILL (or by the OOM killer, or a node going down)
cannot, so the next writer into the same parent removes those whose process is gone. A partial directory holds an
owner file naming its host, so a live run on another node of a shared filesystem (whose pid means nothing here) is
left alone. A full disk is reported as `DiskFullError`, naming the directory and the sizes involved.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

OWNER = ".writer.json"              # inside a partial directory; removed before the rename into place
_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>[0-9]+)")


class DiskFullError(OSError, ValueError):
    """No space left while writing a dataset (errno ENOSPC). Also a ValueError: like any other bad setting it is
    reported in one line naming the directory, not as a traceback."""


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"


def claim(tmp_dir: Path) -> None:
    """Create `tmp_dir` (empty) with its owner file."""
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    (tmp_dir / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the partial directories in `parent` whose writer process no longer exists on this host; log each.
    Live processes' directories, other hosts' and anything not named like a partial directory are kept."""
    removed = []
    if not parent.is_dir():
        return removed
    host = socket.gethostname()
    for path in sorted(parent.iterdir()):
        match = _PARTIAL.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        pid = int(match["pid"])
        try:
            owner = json.loads((path / OWNER).read_text())
        except (OSError, ValueError):
            owner = {}                # written before owner files existed, or killed before it was written
        if pid <= 0 or pid == os.getpid() or owner.get("host", host) != host or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.warning("removed %s: left by process %d, which no longer runs (killed while writing?)", path, pid)
    return removed


@contextlib.contextmanager
def disk_full_reported(directory: Path, what: str, needed: int, written: int) -> Iterator[None]:
    """Turn ENOSPC inside the block into a `DiskFullError` naming `directory`, what was being written, about how
    much it needed, how much the run had written so far and what is free."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC or isinstance(err, DiskFullError):
            raise
        try:
            free = f"{_size(shutil.disk_usage(directory).free)} free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(errno.ENOSPC, f"{directory}: no space left on device while writing {what} (about "
                                          f"{_size(needed)} needed; {_size(written)} written so far; {free}); the "
                                          "partial dataset is removed - free space or choose another --out") from None


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n):,} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
