"""The package is complete without a checkout: a wheel built from this tree, unpacked in a temporary directory and
imported from there (not from the source tree), prints the GPU quickstart's config and reads the packaged training
recipe by its name."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow   # builds a wheel (setuptools) and starts fresh interpreters
def test_an_installed_wheel_runs_the_full_scale_print_config_outside_a_checkout(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("dlscale-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def dlscale(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dlscale.cli", *argv], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
    where = subprocess.run([sys.executable, "-c", "import dlscale; print(dlscale.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    full = dlscale("quickstart", "--scale", "full", "--out", "runs/full", "--print-config")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "precision: bf16" in full.stdout
    assert "model_iii" in full.stdout and "small_input_stem: true" in full.stdout
    train = dlscale("train", "--config", "full", "--stage", "supervised", "--print-config")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "batch_size: 128" in train.stdout and "precision: bf16" in train.stdout
    assert not (work / "runs").exists()
