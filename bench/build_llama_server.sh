#!/bin/sh
# Build llama.cpp's llama-server (and llama-bench) from the llama.cpp copy inside the llama-cpp-python sdist
# on PyPI, for bench/bench_serve.py's peer figures. Benchmarks only, never CI; about 10 minutes on 2 cores.
#   sh bench/build_llama_server.sh [DIR]        -> DIR/build/bin/llama-server (DIR default /tmp/llama-peer)
# CPU flags: native. On the Xeon boxes whose flags claim AMX but whose tiles fault, add -DGGML_NATIVE=OFF
# -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON (see /work/shared/PEERS.md).
set -eu
dir=${1:-/tmp/llama-peer}
version=0.3.36
mkdir -p "$dir"
cd "$dir"
[ -f "llama_cpp_python-$version.tar.gz" ] || pip download "llama-cpp-python==$version" --no-deps --no-binary :all: -d .
[ -d "llama_cpp_python-$version" ] || tar xzf "llama_cpp_python-$version.tar.gz"
cmake -S "llama_cpp_python-$version/vendor/llama.cpp" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON ${CMAKE_ARGS:-}
cmake --build build -j "$(nproc)" --target llama-server llama-bench
echo "built $dir/build/bin/llama-server"
