# Set-up and entry points. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed
export DS_BUILD_OPS = 0
export OMP_WAIT_POLICY = PASSIVE
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: install test demo bench gpu-prepare clean

install: $(STAMP)

# The package and what it runs on (all `make demo` needs); re-installs only when the metadata or the pins change.
$(BASE): setup.cfg pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(BASE)

# ... and the test extras (pytest; lenstronomy, the physics reference, pulls numba and astropy: ~1 min to install).
$(STAMP): $(BASE)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Test files run in parallel, one per core at a time (pytest-xdist; a file's module fixtures start once).
test: install
	$(PY) -m pytest -q -n auto --dist loadfile tests

# The main job: simulated data -> shards -> pretraining from the simulation stream -> supervised -> multi-task ->
# label efficiency -> runs/quickstart/report.md
demo: $(BASE)
	$(VENV)/bin/dlscale quickstart --out runs/quickstart

# Benchmarks (not part of `make test`): bench/results.json
bench: install
	$(PY) bench/run_all.py

# The wheels the GPU machine lacks (deepspeed, webdataset, ...) into .whl/ for bench/gpu/run.sh: bench/README.md
gpu-prepare: install
	bash bench/gpu/prepare.sh

clean:
	rm -rf $(VENV) build *.egg-info
