#!/usr/bin/env bash
# Build llama.cpp's Python binding (llama-cpp-python, its sdist compiles llama.cpp) once and install
# it into the active environment; the tests that run exported GGUFs in llama.cpp need it.
# The wheel is cached in $LLAMA_CPP_WHEELS (default ~/.cache/mlx-dpo-llamacpp): later runs install it
# in seconds. On x86-64 the build uses portable flags (AVX2/FMA/F16C) rather than -march=native.
set -euo pipefail
version=0.3.36
wheels="${LLAMA_CPP_WHEELS:-$HOME/.cache/mlx-dpo-llamacpp}"
mkdir -p "$wheels"
if ! ls "$wheels"/llama_cpp_python-$version-*.whl >/dev/null 2>&1; then
    args="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
    if [ "$(uname -m)" = "x86_64" ]; then
        args="$args -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    fi
    echo "building llama-cpp-python $version (llama.cpp) into $wheels; this takes a few minutes"
    start=$(date +%s)
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
        python -m pip wheel -q --no-deps --no-cache-dir "llama-cpp-python==$version" -w "$wheels"
    echo "built in $(( $(date +%s) - start )) s"
fi
python -m pip install -q --no-deps "$wheels"/llama_cpp_python-$version-*.whl
python -m pip install -q diskcache jinja2  # what llama_cpp imports
