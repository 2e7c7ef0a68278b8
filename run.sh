#!/usr/bin/env bash
# Sets up a virtual environment in .venv (once), installs lsce into it, then
#   bash run.sh bench [args]   runs the benchmark against PyTorch (benchmarks/bench.py)
#   bash run.sh test  [args]   runs the test suite (pytest tests)
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-}"
shift || true
case "$job" in
  bench) extra=bench ;;
  test) extra=test ;;
  *) echo "usage: bash run.sh bench|test [args...]" >&2; exit 2 ;;
esac

venv="${LSCE_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
# torch first and pinned: an unpinned "torch" pulls a multi-GB CUDA build on
# Linux, while 2.13.0 is the CPU wheel this project's machines keep on disk.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q ".[$extra]"

case "$job" in
  bench) exec python benchmarks/bench.py "$@" ;;
  # Plain `pytest` (not `python -m pytest`) so that the installed lsce, with
  # its compiled lsce._C, is imported rather than the source folder. The
  # whole suite unless a test path is given (`bash run.sh test tests/x.py`).
  test)
    paths=tests
    for a in "$@"; do case "$a" in tests*|benchmarks*) paths= ;; esac; done
    exec pytest $paths -q "$@" ;;
esac
