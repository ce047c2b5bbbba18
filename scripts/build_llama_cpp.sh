#!/usr/bin/env bash
# llama.cpp, the peer bench/dtypes.py measures splitmesh against, built from the llama.cpp that the
# llama-cpp-python source distribution on the package registry vendors (no other network needed).
#   scripts/build_llama_cpp.sh            # prints the folder holding llama-bench, llama-batched-bench, ggml-rpc-server
# Cached outside the repository (SPLITMESH_LLAMA_CPP_DIR, default ~/.cache/splitmesh/llama.cpp): a rerun only
# prints the folder. About 8 minutes on 2 cores; JOBS sets the build's parallelism (default: every core).
set -euo pipefail
version=0.3.36
top=${SPLITMESH_LLAMA_CPP_DIR:-$HOME/.cache/splitmesh/llama.cpp}
bin=$top/build-$version/bin
targets=(llama-bench llama-batched-bench ggml-rpc-server)
have_all() { for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done; }
if have_all; then
  echo "$bin"
  exit 0
fi
python=${PYTHON:-python3}
mkdir -p "$top/sdist"
sdist=$top/sdist/llama_cpp_python-$version.tar.gz
if [ ! -s "$sdist" ]; then
  "$python" -m pip download "llama-cpp-python==$version" --no-deps --no-binary :all: -d "$top/sdist" >&2
fi
src=$top/src-$version
if [ ! -d "$src/vendor/llama.cpp" ]; then
  rm -rf "$src.tmp" && mkdir -p "$src.tmp"
  tar -xzf "$sdist" -C "$src.tmp" --strip-components=1
  mv "$src.tmp" "$src"
fi
cmake -S "$src/vendor/llama.cpp" -B "$top/build-$version" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_RPC=ON -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$top/build-$version" --parallel "${JOBS:-$(nproc)}" --target "${targets[@]}" >&2
have_all || { echo "the build finished without ${targets[*]} in $bin" >&2; exit 1; }
echo "$bin"
