#!/usr/bin/env bash
# tools/build_llamacpp.sh — build llama.cpp's llama-bench and llama-server (CPU, native) from the
# source that PyPI's llama-cpp-python sdist carries, for side-by-side benchmarks
# (`make bench-compare`, `make bench-serve`). Everything lives under .cache/llamacpp/ (ignored):
# the sdist (downloaded with pip, checked by sha256), the unpacked source and the build. Nothing
# of llama.cpp is committed or linked into kvsieve. Prints the bin/ folder on the last line.
#   needs: cmake, g++ (build-essential), python3 -m pip; about 10 minutes on 2 cores, once.
set -euo pipefail
cd "$(dirname "$0")/.."
VER=0.3.36
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
DIR=.cache/llamacpp
SRC=$DIR/llama_cpp_python-$VER/vendor/llama.cpp
BUILD=$DIR/build-$VER
mkdir -p "$DIR"
if [ -x "$BUILD/bin/llama-bench" ] && [ -x "$BUILD/bin/llama-server" ]; then
    echo "$BUILD/bin"
    exit 0
fi
command -v cmake >/dev/null || { echo "build_llamacpp: cmake not found (apt-get install cmake)" >&2; exit 1; }
TGZ=$DIR/llama_cpp_python-$VER.tar.gz
if [ ! -f "$TGZ" ]; then
    echo "build_llamacpp: pip download llama-cpp-python==$VER (sdist)" >&2
    "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VER" -d "$DIR" >&2
fi
got=$(sha256sum "$TGZ" | cut -d' ' -f1)
[ "$got" = "$SHA" ] || { echo "build_llamacpp: $TGZ sha256 $got, expected $SHA" >&2; rm -f "$TGZ"; exit 1; }
[ -f "$SRC/CMakeLists.txt" ] || tar xzf "$TGZ" -C "$DIR"
echo "build_llamacpp: configuring and building llama-bench, llama-server in $BUILD (takes a while)" >&2
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
      -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$BUILD" --target llama-bench llama-server -j "$(nproc)" >&2
echo "$BUILD/bin"
