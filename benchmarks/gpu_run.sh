#!/usr/bin/env bash
# The GPU level on a machine with an NVIDIA GPU but no TVM compiler (only Python, CUDA torch and
# numpy): after `dcgraph bench gpu --gpu-mode build` here and copying build/fusion_gpu with the
# tree, run the CUDA correctness tests on the exported shared cases, then check and time every
# row from the prebuilt modules.
# Usage: benchmarks/gpu_run.sh [--quick] [--repeats N]
# Results: benchmarks/results/fusion_gpu[_quick].{json,md,png} (and copies under $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
A=build/fusion_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dcgraph-site "$A"/wheels/*.whl
# dcgraph/ from the checkout (the bench, the reference); the packed tvm without its compiler
export PYTHONPATH="$PWD/$A/site:/tmp/dcgraph-site:$PWD" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
export DCGRAPH_GPU_ARTIFACTS="$PWD/$A"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/backends/test_cuda_run.py || true
timeout "${GPU_RUN_TIMEOUT:-400}" python3 -m dcgraph.bench gpu --gpu-mode run --out benchmarks/results "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/fusion_gpu* "$OUT"/; fi
