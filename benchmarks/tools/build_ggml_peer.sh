#!/usr/bin/env bash
# Build llama.cpp's ggml (CPU backend only) and our driver benchmarks/tools/ggml_peer.c, outside the
# repository, for bench_cpu.py's optional "ggml" peer. None of ggml's code is committed: its source
# is the llama.cpp tree vendored in PyPI's sdist of llama-cpp-python, pinned below by version and
# sha256, and everything lands in $ROPEKERN_GGML_DIR (default /work/peers/ggml):
#
#   $ROPEKERN_GGML_DIR/src/       the sdist, its ggml/ folder (vendor/llama.cpp/ggml), wrapper/
#   $ROPEKERN_GGML_DIR/build/     the CMake build of ggml + driver (Release, GGML_NATIVE=ON, static, OpenMP)
#   $ROPEKERN_GGML_DIR/ggml_peer  the driver bench_cpu.py runs (--ggml DIR or ROPEKERN_GGML_DIR)
#   $ROPEKERN_GGML_DIR/version.json
#
#   bash benchmarks/tools/build_ggml_peer.sh              # JOBS=1 and nice 19 by default (shared host)
#   JOBS=2 ROPEKERN_GGML_DIR=/tmp/ggml bash benchmarks/tools/build_ggml_peer.sh
#
# Re-running it is incremental: the download and the extraction are skipped when already done;
# CMake recompiles only what changed (the driver when ggml_peer.c did). ~10 min at -j1.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36 # vendors ggml 0.25.3
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="${ROPEKERN_GGML_DIR:-/work/peers/ggml}"
JOBS="${JOBS:-1}"
NICE="${NICE:-19}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
for tool in cmake cc c++ tar sha256sum; do
  command -v "$tool" >/dev/null || { echo "build_ggml_peer: '$tool' not found" >&2; exit 1; }
done

mkdir -p "$DIR/src"
SDIST="$DIR/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
  echo "== downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist) into $DIR/src"
  # --no-binary :all: gets the sdist; pip prepares its metadata (scikit-build-core in an isolated
  # build environment) but builds nothing.
  "$PYTHON" -m pip download --no-deps --no-binary :all: --disable-pip-version-check \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$DIR/src"
fi
echo "$SDIST_SHA256  $SDIST" | sha256sum -c --quiet - || { echo "build_ggml_peer: sha256 mismatch for $SDIST" >&2; exit 1; }

GGML_SRC="$DIR/src/ggml"
if [[ ! -f "$GGML_SRC/CMakeLists.txt" ]]; then
  echo "== extracting vendor/llama.cpp/ggml"
  rm -rf "$GGML_SRC.tmp" && mkdir -p "$GGML_SRC.tmp"
  tar -xzf "$SDIST" -C "$GGML_SRC.tmp" --strip-components=3 \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/ggml"
  mv "$GGML_SRC.tmp/ggml" "$GGML_SRC" && rmdir "$GGML_SRC.tmp"
fi

# ggml's CMakeLists run as the top-level project wants ggml.pc.in, which the sdist leaves out; as
# a subproject (the way llama.cpp uses it) it does not. So a small wrapper project adds ggml and
# our driver, and CMake links the static libraries and OpenMP in the right order.
WRAP="$DIR/src/wrapper"
mkdir -p "$WRAP"
cat >"$WRAP/CMakeLists.txt.new" <<CMAKE
cmake_minimum_required(VERSION 3.14)
project(ropekern_ggml_peer C CXX)
add_subdirectory("$GGML_SRC" ggml)
add_executable(ggml_peer "$HERE/ggml_peer.c")
target_link_libraries(ggml_peer PRIVATE ggml)
CMAKE
if cmp -s "$WRAP/CMakeLists.txt.new" "$WRAP/CMakeLists.txt"; then
  rm "$WRAP/CMakeLists.txt.new"
else
  mv "$WRAP/CMakeLists.txt.new" "$WRAP/CMakeLists.txt"
fi

echo "== building ggml (CPU backend, Release, GGML_NATIVE=ON) and the driver: $JOBS job(s) at nice $NICE"
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
if [[ -f "$DIR/build/CMakeCache.txt" ]]; then GEN=(); fi # keep the generator of an existing build
# GGML_LLAMAFILE=ON as llama.cpp's own CMakeLists sets it (ggml's default is OFF).
cmake -S "$WRAP" -B "$DIR/build" "${GEN[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CPU=ON -DGGML_LLAMAFILE=ON \
  -DGGML_BACKEND_DL=OFF -DGGML_OPENMP=ON -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF >/dev/null
nice -n "$NICE" cmake --build "$DIR/build" -j "$JOBS" --target ggml_peer
cp "$DIR/build/ggml_peer" "$DIR/ggml_peer.tmp" && mv "$DIR/ggml_peer.tmp" "$DIR/ggml_peer"

GGML_VERSION="$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$GGML_SRC/CMakeLists.txt" | paste -sd.)"
cat >"$DIR/version.json" <<JSON
{"llama_cpp_python": "$LLAMA_CPP_PYTHON_VERSION", "sdist_sha256": "$SDIST_SHA256", "ggml": "$GGML_VERSION", "cmake": "Release GGML_NATIVE=ON GGML_LLAMAFILE=ON GGML_OPENMP=ON static"}
JSON
echo "== done: $DIR/ggml_peer (ggml $GGML_VERSION from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION)"
"$DIR/ggml_peer" --info
