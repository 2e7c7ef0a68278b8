#!/usr/bin/env bash
# The prepared GPU check (benchmarks/README.md, "The GPU check"). On a machine
# with one NVIDIA GPU and this repository cloned, from anywhere:
#
#   bash benchmarks/gpu_check.sh [--quick] [--out DIR] [--only CHECK,...]
#
# makes an environment in .venv-gpu (LSCE_VENV=DIR elsewhere) that sees the
# packages of the python3 that made it (PYTHON=...), so a CUDA torch and triton
# installed there are used as they are, never replaced by run.sh's CPU wheel;
# installs what is missing (network needed only then) and lsce; then runs
# benchmarks/gpu_checks.py, which writes the results folder and prints the
# summary table with the GPU's name. Exit status: 0 when every check passed,
# 1 when one failed, 2 when there is no usable GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "gpu_check: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 ||
  die "no NVIDIA GPU here (nvidia-smi is missing or lists none); this check needs one"

py="${PYTHON:-python3}"
venv="${LSCE_VENV:-.venv-gpu}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  # The base environment's site-packages after the venv's own (addsitedir: their .pth files too).
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$py" -c 'import site; print("".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))' \
    >"$site/_base_env.pth"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

# torch: the one present, else PyPI's default Linux wheel (the CUDA build); a CPU-only torch stops here.
python -c "import torch" 2>/dev/null || python -m pip install -q torch
python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" ||
  die "torch $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') does not see the GPU"
missing="$(python -c 'import importlib.util as u
print(" ".join(p for p in ("setuptools", "wheel", "pybind11", "triton", "numpy", "pytest", "hypothesis", "tqdm")
               if u.find_spec(p) is None))')"
[ -z "$missing" ] || python -m pip install -q $missing
# lsce itself, built against the torch above (no isolated build environment, no dependency changes).
python -m pip install -q --no-build-isolation --no-deps .

exec python benchmarks/gpu_checks.py "$@"
