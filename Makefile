# dcgraph's two commands (see README):  make run  |  make test
# Each sets up .venv on first use (a minute or so) and reuses it while pyproject.toml and
# this file are unchanged.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-slow lint bench bench-quick bench-train bench-fusion bench-fusion-gpu-build bench-arm setup arm-setup gpu gpu-build wheel-check clean

run: $(STAMP)                  ## the main job on the built-in model
	$(BIN)/dcgraph demo

test: $(STAMP)                 ## lint and the test suite (slow tests excluded)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-slow: $(STAMP)            ## the long tests only
	$(BIN)/python -m pytest -m slow

RESULTS := benchmarks/results
# torch's OpenMP threads must not spin between timed calls (they took the next row's cores); the
# `dcgraph bench` command sets this itself, the scripts get it here (read when torch loads)
bench bench-quick bench-fusion bench-train: export OMP_WAIT_POLICY := PASSIVE

bench: $(STAMP)                ## the question-per-script benchmarks, results in benchmarks/results/
	$(BIN)/python benchmarks/op_speed.py
	$(BIN)/python benchmarks/saved_memory.py
	$(BIN)/python benchmarks/tune_curve.py   # ~20 min: MetaSchedule on 3 layers, up to 256 trials

bench-quick: $(STAMP)
	$(BIN)/dcgraph bench all --quick --out $(RESULTS)
	$(BIN)/python benchmarks/op_speed.py --quick
	$(BIN)/python benchmarks/saved_memory.py --quick
	$(BIN)/python benchmarks/train_grid.py --quick
	$(BIN)/python benchmarks/train_study.py --quick
	$(BIN)/python benchmarks/tune_curve.py --quick --no-progress

bench-fusion: $(STAMP)         ## the fusion suite: op, model, train (+ gpu where present); DB=tuned/ TUNE=16 to tune first
	$(BIN)/dcgraph bench all --out $(RESULTS) $(if $(DB),--db $(DB)) $(if $(TUNE),--tune $(TUNE))

bench-fusion-gpu-build: $(STAMP)  ## the GPU level's TVM CUDA modules + shared cases for benchmarks/gpu_run.sh on a GPU machine
	$(BIN)/dcgraph bench gpu --gpu-mode build

bench-arm: $(STAMP)            ## the ARM level: executed instructions on emulated aarch64, with a row tuned on them
	$(BIN)/dcgraph bench arm --tune 1 --db build/arm-db --out $(RESULTS)

bench-train: $(STAMP)          ## the training grid (about 20 min on 2 cores) and the recipe study (about 35 min)
	$(BIN)/python benchmarks/train_grid.py
	$(BIN)/python benchmarks/train_study.py

gpu: $(STAMP)                  ## on a machine with an NVIDIA GPU and TVM's compiler: CUDA tests + the GPU level
	$(BIN)/python -m pytest tests/backends/test_cuda_run.py
	$(BIN)/dcgraph bench gpu --out $(RESULTS)

gpu-build: bench-fusion-gpu-build  ## (the same) build here for benchmarks/gpu_run.sh on a GPU machine

WHEEL_VENV ?= /tmp/dcgraph-wheel-venv
wheel-check: $(STAMP)          ## build the wheel, install it in a fresh venv outside the checkout, run demo + bench op --quick there
	bash .ci/wheel_check.sh "$(WHEEL_VENV)"

setup: $(STAMP)

arm-setup: $(STAMP)            ## emulated aarch64 for the TVM tests and dcgraph bench arm: qemu, cross gcc, arm64 Python + TVM, the instruction counter (~1 min once)
	$(BIN)/python -m dcgraph.backends.tvm.remote

# torch 2.13.0 first, by exact version: it is the CPU build on this machine's local disk;
# a loose "torch" would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "dcgraph needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,onnx,tvm,train]"
	# model definitions written by others, for the passes' real-architecture tests; pure torch
	# (their metadata asks for torchvision, which no model file used here imports)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps \
		pytorchcv==0.0.74 geffnet==1.0.2 efficientnet-pytorch==0.7.1
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
