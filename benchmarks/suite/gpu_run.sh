#!/usr/bin/env bash
# The suite's GPU level on a machine with an NVIDIA GPU but no TVM compiler (only Python, CUDA
# torch and numpy): after `dcgraph bench gpu --gpu-mode build [--quick]` here and copying
# build/fusion_gpu with the tree, check and time every row from the prebuilt modules.
# Usage: benchmarks/suite/gpu_run.sh [--quick] [--repeats N]
# Results: benchmarks/results/fusion_gpu[_quick].{json,md,png} (and copies under $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/../.."
A=build/fusion_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dcgraph-site "$A"/wheels/*.whl
export PYTHONPATH="$PWD/$A/site:/tmp/dcgraph-site:$PWD" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
timeout "${GPU_RUN_TIMEOUT:-400}" python3 -m benchmarks.suite gpu --gpu-mode run "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/fusion_gpu* "$OUT"/; fi
