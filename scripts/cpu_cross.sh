#!/usr/bin/env bash
# The CPU kernel harness (csrc/tests/test_cpu_kernels.cpp) on aarch64: cross-compiled with the
# units that build there (kernels_generic.cpp and kernels_neon.cpp, the latter when present), linked
# statically (so qemu needs no aarch64 sysroot, no -L) and run under qemu-user. .ci/run calls it
# after ctest.
#
#   bash scripts/cpu_cross.sh [harness options: --full | --quick (default) | --case S | -v]
#
# Needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: apt-get install -y g++-aarch64-linux-gnu
# qemu-user). Without them it fails, saying so, unless ROPEKERN_SKIP_CROSS=1. Overrides:
# AARCH64_CXX, QEMU_AARCH64, ROPEKERN_CROSS_DIR (build folder, default build/cross-aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
cxx=${AARCH64_CXX:-aarch64-linux-gnu-g++}
qemu=${QEMU_AARCH64:-qemu-aarch64}
out=${ROPEKERN_CROSS_DIR:-build/cross-aarch64}

missing=""
command -v "$cxx" >/dev/null 2>&1 || missing="$missing $cxx (g++-aarch64-linux-gnu)"
command -v "$qemu" >/dev/null 2>&1 || missing="$missing $qemu (qemu-user)"
if [ -n "$missing" ]; then
  if [ "${ROPEKERN_SKIP_CROSS:-0}" = 1 ]; then
    echo "cpu_cross: skipped (ROPEKERN_SKIP_CROSS=1); missing:$missing"
    exit 0
  fi
  echo "cpu_cross: missing:$missing" >&2
  echo "cpu_cross: apt-get install -y g++-aarch64-linux-gnu qemu-user, or set ROPEKERN_SKIP_CROSS=1 to skip" >&2
  exit 1
fi

units=(csrc/cpu/kernels_generic.cpp)
[ -f csrc/cpu/kernels_neon.cpp ] && units+=(csrc/cpu/kernels_neon.cpp)
mkdir -p "$out"
flags=(-std=c++17 -O2 -Wall -Wextra -Icsrc/include)
# One compiler per source, in parallel (the generic unit is the long one, ~25 s); objects are
# rebuilt only when a source or header under csrc/ is newer.
objs=()
pids=()
for src in csrc/tests/test_cpu_kernels.cpp "${units[@]}"; do
  obj="$out/$(basename "$src" .cpp).o"
  objs+=("$obj")
  if [ ! -f "$obj" ] || [ -n "$(find csrc/cpu csrc/include csrc/tests/test_cpu_kernels.cpp -newer "$obj" -print -quit)" ]; then
    "$cxx" "${flags[@]}" -c "$src" -o "$obj.tmp" && mv "$obj.tmp" "$obj" &
    pids+=($!)
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$cxx" -static -pthread "${objs[@]}" -o "$out/test_cpu_kernels"
built=$(date +%s)
echo "cpu_cross: built $out/test_cpu_kernels (aarch64, static) in $((built - start)) s"

# --quick unless the caller asks otherwise: ~25 s under qemu (the full list takes several times that)
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--quick)
"$qemu" "$out/test_cpu_kernels" "${args[@]}"
echo "cpu_cross: ran under $qemu in $(($(date +%s) - built)) s"
