"""Run every benchmark (each prints JSON) and collect them, with the machine description, in bench/results.json.

    python bench/run_all.py [--only stream simulate ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("stream", "simulate", "sim_stream", "scale", "engine", "scaling", "tune", "decoder", "pretrain",
              "foundation", "predict", "transfer_methods", "regression", "superres")


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "gpu": gpu, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    a = p.parse_args(argv)
    results: dict = {"machine": machine()}
    failed = []
    for name in a.only:
        print(f"== bench/{name}.py", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py")], capture_output=True, text=True)
        try:
            results[name] = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            results[name] = {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
            failed.append(name)
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
