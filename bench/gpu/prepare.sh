#!/usr/bin/env bash
# Run here, before the GPU machine is started: fill .whl/ (git-ignored) with exactly the wheels the GPU machine
# lacks, one version each, for Python 3.12 manylinux x86_64, so nothing there needs a network or a build.
#
#   bash bench/gpu/prepare.sh          (or: make gpu-prepare)
#
# The GPU machine has python3 3.12 with its own torch (CUDA), torchvision, timm, tensorboard, scikit-learn,
# matplotlib, tqdm and pyyaml (and what they bring: numpy, packaging, ...). Missing: deepspeed and its small runtime
# dependencies, webdataset and braceexpand. Versions are those `make install` put in .venv (deepspeed and
# webdataset as pinned in constraints.txt), so the GPU run uses what the CPU tests use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-.venv/bin/python}
WHL=.whl
TARGET_PYTHON=${TARGET_PYTHON:-3.12}     # the GPU machine's (another value only for a dry run of run.sh here)
CP=cp${TARGET_PYTHON/./}
MAX_MIB=50
if [ ! -x "$PY" ]; then
  echo "prepare.sh: $PY not found: run 'make install' first (the versions come from .venv)" >&2
  exit 1
fi

pin() {   # the constraints.txt version of $1
  sed -n "s/^$1==//p" constraints.txt | head -n 1
}
DEEPSPEED=$(pin deepspeed)
WEBDATASET=$(pin webdataset)
if [ -z "$DEEPSPEED" ] || [ -z "$WEBDATASET" ]; then
  echo "prepare.sh: deepspeed and webdataset must be pinned (name==version) in constraints.txt" >&2
  exit 1
fi

# deepspeed's runtime requirements that torch/timm/tensorboard/matplotlib do not bring (deepspeed also wants numpy,
# packaging, psutil, tqdm, torch: the first two and the last two are there), pydantic's own, and webdataset's
# braceexpand. typing-extensions: pydantic needs a newer one than an older torch install may carry.
DEPS=(hjson ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection typing-extensions msgpack psutil
      einops braceexpand)
PINS=()
for name in "${DEPS[@]}"; do
  version=$("$PY" -c "import sys; from importlib import metadata; print(metadata.version(sys.argv[1]))" "$name") || {
    echo "prepare.sh: $name is not installed in .venv (run 'make install')" >&2; exit 1; }
  PINS+=("$name==$version")
done

rm -rf "$WHL"
mkdir -p "$WHL"
# deepspeed ships as an sdist: build a pure-Python wheel here (no ops compiled; they JIT-build when needed).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "deepspeed==$DEEPSPEED" -w "$WHL"
"$PY" -m pip download -q --only-binary=:all: --python-version "$TARGET_PYTHON" --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --no-deps -d "$WHL" "webdataset==$WEBDATASET" "${PINS[@]}"

# exactly one wheel per package, each installable on CPython $TARGET_PYTHON x86_64
"$PY" - "$CP" "$WHL" "deepspeed" "webdataset" "${DEPS[@]}" <<'EOF'
import re
import sys
from pathlib import Path

cp, folder, wanted = sys.argv[1], Path(sys.argv[2]), {re.sub(r"[-_.]+", "_", n).lower() for n in sys.argv[3:]}
wheels = sorted(folder.glob("*.whl"))
names = [re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower() for w in wheels]
problems = [f"{n}: {names.count(n)} wheels" for n in sorted(set(names)) if names.count(n) > 1]
problems += [f"{n}: no wheel" for n in sorted(wanted - set(names))]
problems += [f"{n}: not asked for" for n in sorted(set(names) - wanted)]
for w in wheels:
    python_tag, abi, platform = w.name[:-4].split("-")[-3:]
    if not (python_tag in ("py3", "py2.py3", cp) or python_tag.startswith("cp3") and abi == "abi3"):
        problems.append(f"{w.name}: not for CPython {cp}")
    if platform != "any" and "x86_64" not in platform:
        problems.append(f"{w.name}: not for x86_64")
if problems:
    sys.exit("prepare.sh: " + "; ".join(problems))
EOF

total=$(du -sb "$WHL" | cut -f1)
mib=$(( (total + 1048575) / 1048576 ))
ls -l "$WHL"
echo "$WHL: $(ls "$WHL" | wc -l) wheels, $mib MiB"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "prepare.sh: $WHL is $mib MiB, over the $MAX_MIB MiB meant for it (64 MiB may be carried in all)" >&2
  exit 1
fi
cat <<EOF

Ready. On the GPU machine (the working tree is copied there; carry the ignored wheel folder with it):
  paths to carry:   ["$WHL"]
  the one command:  bash bench/gpu/run.sh "\$OUT"
  (with a timeout of at least the check's budget + 60 s: default budget 480 s; --budget-s 300 leaves room for a
   second try; see bench/README.md)
EOF
