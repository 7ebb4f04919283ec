"""The prepared GPU check: dlscale's CUDA / NCCL / bf16 paths in one command, one JSON file back.

    bash bench/gpu/run.sh OUT                          # on the GPU machine: install .whl/, then this script
    python bench/gpu/check.py --out DIR [--tiny] [--budget-s 480]

Writes DIR/gpu_check.json (rewritten after every part, so a killed run still leaves what it measured) and
DIR/gpu_check.log. Parts: 1 environment, 2 simulator on CUDA, 3 training through `torchrun -m dlscale.train`
(bf16) next to a plain PyTorch loop, 4 the simulation stream feeding training, 5 a shortened `--scale full`
quickstart (its report.md copied into DIR). Each part gets a slice of the budget and sizes its work to it; each is
guarded, so an error is recorded (message and traceback tail) and the next part runs. Without CUDA the GPU parts are
recorded as {"skipped": "no CUDA"}; with --tiny they run in tiny form on the CPU instead (simulator, plain loop, one
tiny training run with --device=cpu), so the same code path is exercised (tests/test_gpu_check.py).

Training goes through the CLI contract only (`dlscale simulate`, `python -m dlscale.train --stage ...`,
`dlscale quickstart`). Exit status: 0 when no part errored, 1 otherwise, 3 when the watchdog stopped it.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from harness import Budget, Report, has_error, log, tail
from parts import environment_part, sim_stream_part, simulator_part
from quickstart_chain import quickstart_part
from training import training_part

HERE = Path(__file__).resolve().parent
PARTS = {"environment": environment_part, "simulator": simulator_part, "training": training_part,
         "sim_stream": sim_stream_part, "quickstart": quickstart_part}
WEIGHTS = {"environment": 0.04, "simulator": 0.10, "training": 0.48, "sim_stream": 0.10, "quickstart": 0.28}


class Check:
    """What the parts share: mode, device, folders, the child-process environment and command builders."""

    def __init__(self, args: argparse.Namespace, report: Report):
        self.report, self.tiny, self.out = report, args.tiny, args.out
        self.root = HERE.parents[1]
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dlscale-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.python = sys.executable
        self.cuda = False                      # set by the environment part
        self.encoders: list[str] | None = None
        self.overhead_s = 10.0 if self.tiny else 30.0   # engine start-up + eval + export per run (a guess at first)
        self.overheads: list[float] = []
        self.engine_factor = 2.0               # engine step time over the plain loop's (a cautious first guess)
        self.engine_ratios: list[float] = []
        self._help: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=2)
        path = os.environ.get("PYTHONPATH")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE",
                    "PYTHONPATH": f"{self.root}{os.pathsep + path if path else ''}"}

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def precision(self) -> str:
        return "bf16" if self.cuda else "fp32"    # CPU runs are fp32 (bf16 is 5-8x slower there)

    def configure_children(self) -> None:
        """Once the device is known: CPU children use DeepSpeed's CPU accelerator and one torch thread each."""
        if not self.cuda:
            self.env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=self.env.get("OMP_NUM_THREADS", "1"),
                            GPU_CHECK_THREADS=self.env.get("OMP_NUM_THREADS", "1"))

    # ---- commands -----------------------------------------------------------------------------------------------
    def cli(self, *args) -> list[str]:
        """`dlscale ARGS` (the console script may not be installed there: the package is on PYTHONPATH)."""
        return [self.python, "-m", "dlscale.cli", *map(str, args)]

    def train_cmd(self, args: list[str]) -> list[str]:
        """torchrun --standalone --nproc_per_node 1 -m dlscale.train ARGS (faster to start than `deepspeed`)."""
        return [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "-m", "dlscale.train", *args]

    def probe(self, name: str, args: dict) -> list[str]:
        import json
        return [self.python, str(HERE / "probes.py"), name, json.dumps(args)]

    def prefetch_help(self) -> None:
        """Start the CLI's --help / --print-config calls in the background (each imports the whole engine)."""
        for cmd in (self.train_help_cmd(), self.train_help_cmd("--print-config")):
            self.help_text(cmd, wait=False)

    def help_text(self, cmd: list[str], wait: bool = True) -> str | None:
        key = " ".join(cmd)
        if key not in self._help:
            self._help[key] = self._pool.submit(self.report.run, cmd, 180, self.env)
        if not wait:
            return None
        result = self._help[key].result()
        if not result.ok:
            raise RuntimeError(f"{result.failure()}\n{tail(result.output)}")
        return result.output

    def train_help_cmd(self, *args: str) -> list[str]:
        return [self.python, "-m", "dlscale.train", *(args or ("--help",))]

    def train_stages(self) -> list[str]:
        """The `--stage` choices of `python -m dlscale.train --help`."""
        text = self.help_text(self.train_help_cmd())
        found = re.search(r"--stage \{([^}]*)\}", text)
        if not found:
            raise RuntimeError(f"no `--stage {{...}}` choices in python -m dlscale.train --help:\n{tail(text, 800)}")
        return [s.strip() for s in found.group(1).split(",")]

    def train_keys(self) -> set[str]:
        """Dotted config keys that `python -m dlscale.train --help` names, plus those `--print-config` prints."""
        text = self.help_text(self.train_help_cmd())
        keys = set(re.findall(r"--([a-z_]+(?:\.[a-z_]+)+)", text))
        if "--print-config" in text:
            keys |= yaml_keys(self.help_text(self.train_help_cmd("--print-config")))
        return keys

    def config_key(self, *candidates: str) -> str:
        """The first of `candidates` the training config has (keys move while the engine is refactored)."""
        keys = self.train_keys()
        return next((k for k in candidates if k in keys), candidates[0])

    def detect_cuda(self) -> bool:
        result = self.report.run([self.python, "-c", "import torch; print(torch.cuda.is_available())"], 120, self.env)
        return result.ok and result.output.strip().endswith("True")

    def git_description(self) -> str:
        try:
            out = subprocess.run(["git", "-C", str(self.root), "describe", "--always", "--dirty"],
                                 capture_output=True, text=True, timeout=20)
            return out.stdout.strip() or "unknown (not a git checkout)"
        except (OSError, subprocess.SubprocessError):
            return "unknown (no git)"


def yaml_keys(text: str) -> set[str]:
    """Dotted keys of a YAML mapping (empty when the text is not one)."""
    try:
        import yaml
        tree = yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - not YAML: no keys
        return set()

    def walk(node, prefix: str) -> set[str]:
        if not isinstance(node, dict):
            return set()
        keys = set()
        for k, v in node.items():
            keys.add(prefix + str(k))
            keys |= walk(v, f"{prefix}{k}.")
        return keys
    return walk(tree, "")


def setup_logging(out: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    log.propagate = False
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    for handler in (logging.FileHandler(out / "gpu_check.log", mode="a"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.log")
    p.add_argument("--tiny", action="store_true", help="tiny sizes; without CUDA the GPU parts run on the CPU")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget shared by the parts")
    p.add_argument("--grace-s", type=float, default=None, help="past budget + grace the watchdog stops the check "
                                                               "(default: 5%% of the budget, at least 20 s)")
    p.add_argument("--work", help="scratch folder for shards and runs (default: a new temporary one, removed)")
    p.add_argument("--only", nargs="+", choices=list(PARTS), help="run only these parts (environment always runs)")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s}: expected a positive number of seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    setup_logging(args.out)
    report = Report(args.out, {"mode": "tiny" if args.tiny else "full", "budget_s": args.budget_s,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(),
                               "command": " ".join([Path(sys.executable).name, *sys.argv])})
    check = Check(args, report)
    report.data["work"] = str(check.work)
    grace = args.grace_s if args.grace_s is not None else max(20.0, 0.05 * args.budget_s)
    watchdog = report.start_watchdog(args.budget_s + grace)
    check.prefetch_help()
    chosen = ["environment", *(args.only or [name for name in PARTS if name != "environment"])]
    budget = Budget(args.budget_s, {name: WEIGHTS[name] for name in PARTS if name in chosen})
    log.info("dlscale GPU check (%s), budget %.0f s, out %s, work %s", report.data["mode"], args.budget_s, args.out,
             check.work)
    for name in PARTS:
        if name not in chosen:
            report.data["parts"][name] = {"status": "skipped", "skipped": "not chosen (--only)"}
    for name in budget.weights:
        report.part(name, budget.slice_for(name), lambda entry, slice_s, fn=PARTS[name]: fn(check, entry, slice_s))
    watchdog.cancel()
    report.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    report.write()
    if not args.work:
        shutil.rmtree(check.work, ignore_errors=True)
    failed = [name for name, part in report.data["parts"].items() if has_error(part)]
    log.info("done in %.0f s: %s", report.data["elapsed_s"],
             f"errors in {', '.join(failed)}" if failed else "no errors")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
