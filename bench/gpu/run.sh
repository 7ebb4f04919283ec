#!/usr/bin/env bash
# On the GPU machine, from a copy of the working tree with .whl/ carried (bench/gpu/prepare.sh made it):
#
#   bash bench/gpu/run.sh OUT [check.py options, e.g. --budget-s 300]
#
# Installs the carried wheels into a private folder (no network, no build isolation, no dependency resolution),
# puts the repository and that folder on PYTHONPATH so `import dlscale` works without installing it, and runs
# bench/gpu/check.py --out OUT. OUT gets gpu_check.json, gpu_check.log (the install lines first) and report.md.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:?usage: bash bench/gpu/run.sh OUT [check.py options]}
shift
PY=${PYTHON:-python3}
SITE=${DLSCALE_GPU_SITE:-${TMPDIR:-/tmp}/dlscale-gpu-site}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"

{
  echo "run.sh: $(date '+%F %T') on $(hostname), $("$PY" --version 2>&1), site $SITE"
  shopt -s nullglob
  wheels=("$ROOT"/.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "run.sh: no wheels in $ROOT/.whl (was .whl carried? run bench/gpu/prepare.sh first); going on without"
  elif ! { "$PY" -m pip --version >/dev/null 2>&1 && "$PY" -m pip install --no-index --no-deps --upgrade \
             --disable-pip-version-check -q --target "$SITE" "${wheels[@]}"; }; then
    # no pip, or it failed: a wheel is a zip of its installed files (the check reports what does not import)
    echo "run.sh: pip install --target unavailable or failed; unpacking ${#wheels[@]} wheels into $SITE"
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" "${wheels[@]}" || echo "run.sh: unpacking failed too"
  fi
  echo "run.sh: ${#wheels[@]} wheels; installed: $(ls "$SITE" 2>/dev/null | grep -c dist-info) dist-info folders"
} >>"$LOG" 2>&1

export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export DS_BUILD_OPS=0 OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/bench/gpu/check.py" --out "$OUT" "$@"
