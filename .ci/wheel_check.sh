#!/usr/bin/env bash
# The installed package works without the source checkout: build the wheel, install it (with its
# extras) into a fresh virtualenv, and from a directory outside the checkout run the main job
# (`dcgraph demo`) and the fusion suite's op level (`dcgraph bench op --quick --out DIR`).
# Usage: .ci/wheel_check.sh [VENV]   (default /tmp/dcgraph-wheel-venv; recreated every run)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-/tmp/dcgraph-wheel-venv}"
WORK="$(mktemp -d /tmp/dcgraph-wheel-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PIP=(--quiet --disable-pip-version-check)

"$ROOT/.venv/bin/python" -m pip wheel "${PIP[@]}" --no-deps --wheel-dir "$WORK/dist" "$ROOT"
WHEEL="$(ls "$WORK"/dist/dcgraph-*.whl)"
echo "wheel-check: built $(basename "$WHEEL")"
rm -rf "$VENV"
python3 -m venv "$VENV"
# torch 2.13.0 first, by exact version: the CPU build on this machine's local disk
"$VENV/bin/python" -m pip install "${PIP[@]}" torch==2.13.0
"$VENV/bin/python" -m pip install "${PIP[@]}" "${WHEEL}[onnx,tvm,train]"
cd "$WORK"  # nothing of the checkout is importable from here
"$VENV/bin/python" - <<'PY'
import dcgraph, dcgraph.bench, dcgraph.backends.tvm
for mod in (dcgraph, dcgraph.bench, dcgraph.backends.tvm):
    assert "site-packages" in mod.__file__, mod.__file__
print("wheel-check: dcgraph imports from", dcgraph.__file__.rsplit("/dcgraph/", 1)[0])
PY
"$VENV/bin/dcgraph" demo --no-progress
"$VENV/bin/dcgraph" bench op --quick --out "$WORK/results"
test -s "$WORK/results/fusion_op_quick.json" && test -s "$WORK/results/fusion_op_quick.md"
echo "wheel-check: ok (dcgraph demo and dcgraph bench op --quick from the installed wheel)"
