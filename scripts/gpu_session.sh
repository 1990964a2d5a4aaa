#!/usr/bin/env bash
# What to run when a GPU machine is lent (the `device` tool: one H100/H200, ~30 minutes of device
# time, 10 minutes and 8 returned files per command, no package index; its python3 carries torch,
# triton, pytest, pytest-xdist, pytest-timeout, hypothesis and ninja). Two calls cover it all:
#
#   bash scripts/gpu_session.sh build-test  # env.txt, build.log, test.log, junit.xml   (~6-9 min)
#   bash scripts/gpu_session.sh bench       # bench.log + fwd/bwd/decode/rope JSON       (~8-9 min)
#
# Everything is written under $OUT (the device tool returns it), else build/gpu_session/. `bench`
# builds the extension first when it is missing (a machine that went cold between the calls).
# Each step has its own time limit, so one hang cannot eat the call; a step that runs out is
# reported in its log and the next one still runs.
#
# Overrides (used by tests/test_gpu_session.py to run the same script on a CPU machine):
#   PYTHON (python3), ARCH (TORCH_CUDA_ARCH_LIST, 9.0), JOBS (pytest workers, 8),
#   BUILD_CUDA (ROPEKERN_BUILD_CUDA, 1), TESTS (pytest arguments, "tests"),
#   BENCH_DEVICE (cuda), BENCH_GRID (extra benchmark arguments), T_BUILD/T_TEST (seconds), T_BENCH
#   (seconds per benchmark, else 210/150/120/60) and BUDGET (seconds for the whole command, 570).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu_session}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

# The device tool kills a command at 600 s with everything it started; every step's limit is cut
# to what is left of BUDGET seconds, so the last step ends (and writes its files) before that.
start=$(date +%s)
limit() {  # the smaller of $1 and the seconds left of BUDGET (at least 1)
  local left=$(( ${BUDGET:-570} - ($(date +%s) - start) ))
  (( left < 1 )) && left=1
  echo $(( $1 < left ? $1 : left ))
}

env_report() {
  {
    stamp "environment"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$py" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count)
else:
    print("device: no CUDA device visible to torch")
EOF
    nvcc --version 2>&1 | tail -1 || true
  } >"$out/env.txt" 2>&1
}

build() {
  stamp "build (ROPEKERN_BUILD_CUDA=${BUILD_CUDA:-1}, TORCH_CUDA_ARCH_LIST=${ARCH:-9.0})" | tee -a "$out/env.txt"
  ROPEKERN_BUILD_CUDA=${BUILD_CUDA:-1} TORCH_CUDA_ARCH_LIST=${ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout "$(limit "${T_BUILD:-420}")" "$py" setup.py build_ext --inplace >"$out/build.log" 2>&1
  local rc=$?
  stamp "build rc=$rc" | tee -a "$out/env.txt"
  "$py" -c "import ropekern as rk; print('backends:', rk.available_backends())" >>"$out/env.txt" 2>&1
  return $rc
}

run_tests() {
  stamp "tests: ${TESTS:-tests}" | tee -a "$out/env.txt"
  # --timeout: one hung kernel fails its test instead of the whole call; -n: the suite's CPU-side
  # reference work spreads over the machine's 16 cores. Each only when its plugin is there.
  local flags=(-q -p no:cacheprovider --junitxml="$out/junit.xml")
  "$py" -c "import xdist" 2>/dev/null && flags+=(-n "${JOBS:-8}")
  "$py" -c "import pytest_timeout" 2>/dev/null && flags+=(--timeout=180)
  # shellcheck disable=SC2086
  timeout "$(limit "${T_TEST:-420}")" "$py" -m pytest "${flags[@]}" ${TESTS:-tests} >"$out/test.log" 2>&1
  local rc=$?
  stamp "tests rc=$rc" | tee -a "$out/env.txt" "$out/test.log"
  return $rc
}

bench_one() {  # name, seconds, script, args...
  local name=$1 secs=$2 script=$3
  shift 3
  stamp "$name: $script $*" | tee -a "$out/bench.log"
  # shellcheck disable=SC2086
  timeout "$(limit "$secs")" "$py" "benchmarks/$script" --device "${BENCH_DEVICE:-cuda}" --no-save --no-progress \
    --json "$out/$name.json" "$@" ${BENCH_GRID:-} >>"$out/bench.log" 2>&1
  stamp "$name rc=$?" | tee -a "$out/bench.log"
}

benchmarks() {
  "$py" -c "import ropekern._C" 2>/dev/null || build || true
  # The forward (RoPE tax, fused vs separate, vs eager RoPE + SDPA, every scaling type; SDPA's flash
  # backend stands in for FlashAttention-2, which the machine does not carry), the backward (tax,
  # peak memory), decode (GB/s of K/V) and apply_rope alone. The limits
  # add up to 540 s, inside the device tool's 600 s per command.
  bench_one fwd "${T_BENCH:-210}" bench_rope_attention.py --preset quick --rope-type all
  bench_one bwd "${T_BENCH:-150}" bench_backward.py --preset quick
  bench_one decode "${T_BENCH:-120}" bench_decode.py --preset quick --seqlens 1k,4k,8k,16k,32k
  bench_one rope "${T_BENCH:-60}" bench_apply_rope.py --preset quick
}

case "${1:-}" in
  build-test)
    env_report
    build && run_tests
    ;;
  bench)
    [ -s "$out/env.txt" ] || env_report
    benchmarks
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh build-test|bench" >&2
    exit 2
    ;;
esac
