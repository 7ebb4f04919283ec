"""The GPU check's bookkeeping: time slices, guarded parts and items, child processes, the JSON report.

Standard library only, and no CUDA in this process: every measurement that touches torch runs in a child (a probe
or a CLI command) with a timeout, so a hang, a segfault or a CUDA error costs one figure, never the report.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("gpu_check")
RESULT_PREFIX = "@@gpu-check "          # a probe's result line: prefix + one JSON object with a "name"
TAIL_CHARS = 3000                       # how much of a failing command's output goes into the report


def tail(text: str, chars: int = TAIL_CHARS) -> str:
    text = text.replace("\r", "\n")
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines)[-chars:]


def has_error(value) -> bool:
    """True when `value` holds an "error" entry at any depth (a failed item, or a failed figure inside one)."""
    if isinstance(value, dict):
        return "error" in value or any(has_error(v) for v in value.values())
    if isinstance(value, list):
        return any(has_error(v) for v in value)
    return False


def rounded(value):
    """Floats to 4 significant digits, recursively (the report is read by people)."""
    if isinstance(value, float):
        return value if not math.isfinite(value) or value == 0 else float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Atomically (dlscale.io when importable: the check must still report when dlscale does not import)."""
    try:
        from dlscale.io import write_json as dlscale_write_json
    except Exception:  # noqa: BLE001 - the import failure itself is reported by the environment part
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
        return
    dlscale_write_json(path, json.loads(json.dumps(data, default=str)))


class Budget:
    """Wall-clock budget shared out as slices: a part gets the time left times its weight over the weights of the
    parts still to run, so time a part does not use goes to the later ones and an overrun shrinks them."""

    def __init__(self, total_s: float, weights: dict[str, float]):
        self.total_s, self.weights, self.start = total_s, dict(weights), time.monotonic()
        self.pending = list(weights)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return max(0.0, self.total_s - self.elapsed())

    def slice_for(self, part: str) -> float:
        weight = sum(self.weights[p] for p in self.pending)
        share = self.left() * self.weights[part] / weight if weight else 0.0
        self.pending.remove(part)
        return share


class CommandResult:
    def __init__(self, cmd: list[str], returncode: int | None, output: str, seconds: float, timed_out: bool):
        self.cmd, self.returncode, self.output, self.seconds, self.timed_out = cmd, returncode, output, seconds, \
            timed_out

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def results(self) -> dict[str, dict]:
        """The probe result lines of the output, by name (also those printed before a timeout or crash)."""
        found = {}
        for line in self.output.splitlines():
            if line.startswith(RESULT_PREFIX):
                try:
                    item = json.loads(line[len(RESULT_PREFIX):])
                except ValueError:
                    continue
                found[item.pop("name")] = item
        return found

    def failure(self) -> str:
        what = f"timed out after {self.seconds:.0f} s" if self.timed_out else f"exit status {self.returncode}"
        return f"{' '.join(self.cmd[:6])}{' ...' if len(self.cmd) > 6 else ''}: {what}"


class Report:
    """The JSON report and log of one check: parts and items guarded, the file rewritten after each part."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.lock, self.start = out, threading.RLock(), time.monotonic()
        self.data = {"format": "dlscale-gpu-check/1", **meta, "parts": {}}
        self.current: dict | None = None           # the part running now (the watchdog names it)
        self.children: set[subprocess.Popen] = set()  # the commands running now (the watchdog ends them)

    # ---- parts and items --------------------------------------------------------------------------------------
    def part(self, name: str, slice_s: float, fn: Callable[[dict, float], None]) -> dict:
        """Run `fn(entry, slice_s)`; it fills `entry` (figures, settings, items) or raises; the error is recorded,
        the check goes on."""
        entry: dict = {"status": "running", "slice_s": round(slice_s, 1)}
        with self.lock:
            self.data["parts"][name] = entry
            self.current = entry
        start = time.monotonic()
        log.info("== part %s (slice %.0f s)", name, slice_s)
        try:
            fn(entry, slice_s)
            if "skipped" in entry:
                entry["status"] = "skipped"
            else:
                errors = [k for k, v in entry.get("items", {}).items() if has_error(v)]
                entry["status"] = "error" if errors else "ok"
                if errors:
                    entry["errors_in"] = errors
        except Exception as err:  # noqa: BLE001 - every failure is recorded and the next part runs
            self._record_error(entry, err)
        entry["elapsed_s"] = round(time.monotonic() - start, 1)
        log.info("== part %s: %s in %.0f s%s", name, entry["status"], entry["elapsed_s"],
                 f" ({entry['skipped']})" if "skipped" in entry else
                 f" ({entry.get('error') or 'errors in ' + ', '.join(entry.get('errors_in', []))})"
                 if entry["status"] == "error" else "")
        with self.lock:
            self.current = None
        self.write()
        return entry

    def item(self, entry: dict, name: str, fn: Callable[[dict], None]) -> dict:
        """One guarded item of a part (a training run, a figure group): `fn(item)` fills it or raises."""
        item: dict = {}
        entry.setdefault("items", {})[name] = item
        start = time.monotonic()
        try:
            fn(item)
            item["status"] = "skipped" if "skipped" in item else "error" if has_error(item) else "ok"
        except Exception as err:  # noqa: BLE001
            self._record_error(item, err)
            log.warning("item %s failed: %s", name, item["error"])
        item.setdefault("elapsed_s", round(time.monotonic() - start, 1))
        self.write()
        return item

    @staticmethod
    def _record_error(target: dict, err: BaseException) -> None:
        target["status"] = "error"
        target["error"] = f"{type(err).__name__}: {err}"
        target["traceback"] = tail("".join(traceback.format_exception(err)), 2000)

    # ---- commands ---------------------------------------------------------------------------------------------
    def run(self, cmd: list[str], timeout_s: float, env: dict | None = None, log_name: str | None = None,
            cwd: Path | None = None) -> CommandResult:
        """Run `cmd` in its own process group; past `timeout_s` the whole group is ended (TERM, then KILL)."""
        timeout_s = max(1.0, timeout_s)
        log.info("$ %s  (timeout %.0f s)", " ".join(cmd), timeout_s)
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, cwd=cwd, start_new_session=True)
        with self.lock:
            self.children.add(proc)
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            end_group(proc)
            output, _ = proc.communicate()
        finally:
            with self.lock:
                self.children.discard(proc)
        result = CommandResult(cmd, proc.returncode, output or "", time.monotonic() - start, timed_out)
        if log_name:
            shown = tail(result.output, 6000) if not result.ok else tail(result.output, 1500)
            log.info("-- %s: %s in %.1f s, output tail:\n%s", log_name, "ok" if result.ok else result.failure(),
                     result.seconds, shown)
        return result

    # ---- files ------------------------------------------------------------------------------------------------
    def write(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
            counts: dict[str, int] = {}
            for part in self.data["parts"].values():
                counts[part["status"]] = counts.get(part["status"], 0) + 1
                for item in part.get("items", {}).values():
                    key = f"items_{item.get('status', 'ok')}"
                    counts[key] = counts.get(key, 0) + 1
            self.data["summary"] = counts
            write_json(self.out / "gpu_check.json", rounded(self.data))

    def start_watchdog(self, after_s: float) -> threading.Timer:
        """Past `after_s` the check stops itself: the running part is marked, its command ended, the report written,
        so an outer timeout never finds a report without the reason."""
        def fire() -> None:
            with self.lock:
                if self.current is not None:
                    self.current.update(status="error", error=f"watchdog: the check passed {after_s:.0f} s "
                                        "(budget plus grace) inside this part; stopped here")
                for child in list(self.children):
                    end_group(child)
                self.data["stopped_by_watchdog"] = True
                self.write()
            log.error("watchdog: stopped after %.0f s", after_s)
            logging.shutdown()
            os._exit(3)

        timer = threading.Timer(after_s, fire)
        timer.daemon = True
        timer.start()
        return timer


def end_group(proc: subprocess.Popen) -> None:
    """End a child started with start_new_session=True and everything it started (torchrun's workers, loaders)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class GpuMemorySampler(threading.Thread):
    """Peak GPU memory of a child process, which `torch.cuda.max_memory_allocated` cannot see: nvidia-smi sampled
    every `interval_s`. Per-process memory when nvidia-smi lists processes (not in every container), else the
    device's used memory over the baseline taken before the child started."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.stop_event = interval_s, threading.Event()
        self.baseline = self.query()[0]
        self.peak_used, self.peak_processes, self.samples = 0, 0, 0

    @staticmethod
    def query() -> tuple[int, int]:
        def smi(*args: str) -> list[str]:
            out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        try:
            used = sum(int(float(v)) for v in smi("--query-gpu=memory.used"))
            apps = sum(int(float(line.split(",")[-1])) for line in smi("--query-compute-apps=pid,used_memory")
                       if line.split(",")[-1].strip().replace(".", "").isdigit())
            return used, apps
        except (OSError, subprocess.SubprocessError, ValueError):
            return 0, 0

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            used, apps = self.query()
            self.peak_used, self.peak_processes = max(self.peak_used, used), max(self.peak_processes, apps)
            self.samples += 1

    def figures(self) -> dict:
        self.stop_event.set()
        self.join(timeout=15)
        if self.peak_processes:
            return {"peak_memory_mib": self.peak_processes, "peak_memory_source": "nvidia-smi per-process",
                    "nvidia_smi_samples": self.samples}
        return {"peak_memory_mib": max(0, self.peak_used - self.baseline),
                "peak_memory_source": "nvidia-smi device used minus baseline", "baseline_mib": self.baseline,
                "nvidia_smi_samples": self.samples}
