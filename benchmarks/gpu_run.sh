#!/usr/bin/env bash
# On a GPU machine that has no TVM compiler (only Python, CUDA torch and numpy), after
# `make gpu-build` here and copying build/gpu_kernels with the tree: run the CUDA correctness
# tests and the kernel benchmark from the prebuilt modules. Results: benchmarks/results/gpu_kernels.*
# (and copies under $OUT when set). On a machine with TVM's compiler and a GPU, use `make gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
A=build/gpu_kernels
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dcgraph-site "$A"/wheels/*.whl
export PYTHONPATH="$PWD/$A/site:/tmp/dcgraph-site:$PWD" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/backends/test_cuda_run.py
timeout 230 python3 benchmarks/gpu_kernels.py run
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu_kernels.* "$OUT"/; fi
