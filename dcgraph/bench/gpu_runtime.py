"""TVM CUDA modules built on one machine, run on another: compile here (no GPU needed), pack TVM's
runtime, and on the GPU machine load, run and time them with TVM's runtime alone.

The machine that compiles TVM code has no GPU, and the GPU machine has no TVM compiler. So
:func:`compile_cuda` and :func:`pack_runtime` run here (``dcgraph bench gpu --gpu-mode build``),
and :func:`cuda_runtime`, :func:`load_vm`, :func:`run_vm` there (``benchmarks/gpu_run.sh``:
Python, CUDA torch, numpy, the packed ``tvm`` and an ``apache-tvm-ffi`` wheel; nothing else).
The CUDA code in the exported modules is compiled when they are loaded: by NVRTC (needs the
``cuda-bindings`` and ``nvidia-cuda-nvrtc`` packages) or, with ``TVM_CUDA_COMPILE_MODE=nvcc``,
by ``nvcc`` on the PATH.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

#: the apache-tvm-ffi wheel a GPU machine with Python 3.12 needs (put it in ``<artifacts>/wheels``)
FFI_WHEEL_HELP = (
    "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
    "--platform manylinux_2_28_x86_64 -d {wheels} apache-tvm-ffi==0.1.14.post1")

__all__ = ["FFI_WHEEL_HELP", "NoGPU", "compile_cuda", "cuda_runtime", "cuda_target", "load_vm",
           "pack_runtime", "run_vm", "summary", "time_torch", "time_tvm"]


class NoGPU(RuntimeError):
    """No CUDA device (or no TVM CUDA runtime) on this machine."""


def cuda_target(arch: str = "sm_90"):
    from dcgraph.backends.tvm import targets
    return targets.resolve("cuda" if arch == "sm_90" else {**targets.CUDA, "arch": arch})


def compile_cuda(mod, target):
    """``tvm.compile`` with dcgraph's pipeline (the GPU default schedules)."""
    import tvm

    from dcgraph.backends.tvm.pipeline import relax_pipeline
    return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))


def pack_runtime(out: Path) -> Path:
    """Copy TVM's Python package minus the compiler library (and cutlass headers) to ``out/site``."""
    import tvm
    src = Path(tvm.__file__).parent
    dst = out / "site" / "tvm"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        "libtvm_compiler.so", "3rdparty", "__pycache__", "*.pyc"))
    return dst


def _preload_cudart() -> None:
    """Make ``libcudart.so.13`` (which TVM's CUDA runtime links) loadable if it is not on the path."""
    patterns = ["/usr/local/cuda/lib64/libcudart.so.13*", "/usr/local/cuda-*/lib*/libcudart.so.13*",
                "/usr/local/cuda-*/targets/x86_64-linux/lib/libcudart.so.13*"]
    patterns += [os.path.join(p, "nvidia", "*", "lib", "libcudart.so.13*") for p in sys.path if p]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _nvcc_cubin(code: str, arch: str) -> bytes:
    """``nvcc --cubin`` on one CUDA source (what ``TVM_CUDA_COMPILE_MODE=nvcc`` asks for)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dcgraph-nvcc-") as tmp:
        src, out = Path(tmp) / "tvm_kernels.cu", Path(tmp) / "tvm_kernels.cubin"
        src.write_text(code)
        cmd = ["nvcc", "--cubin", "-O3", f"-arch={arch}", "--use_fast_math", "-w", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
        return out.read_bytes()


def _register_cuda_compile(arch: str) -> None:
    """Compile CUDA source at module load for ``arch`` (a runtime-only TVM has no Target, which
    TVM's own ``tvm_callback_cuda_compile`` asks for the arch): NVRTC by default, nvcc with
    ``TVM_CUDA_COMPILE_MODE=nvcc``, as TVM does."""
    import tvm_ffi
    from tvm.support import nvcc

    def compile_source(code: str, *_: Any) -> bytes:
        if os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower() == "nvcc":
            return _nvcc_cubin(code, arch)
        return bytes(nvcc._compile_cuda_nvrtc(code, "cubin", arch=arch))

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)


def cuda_runtime() -> ModuleType:
    """``tvm`` with its CUDA runtime loaded (also with a runtime-only TVM); raises :class:`NoGPU`."""
    import tvm
    import tvm.base

    if "tvm_runtime_cuda" not in tvm.base._LOADED_LIBS:  # runtime-only TVM skips the CUDA sidecar
        from tvm_ffi.libinfo import load_lib_ctypes

        def load() -> None:
            tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=tvm.libinfo.package_lib_paths())

        try:
            load()
        except (OSError, RuntimeError):
            _preload_cudart()
            try:
                load()
            except (OSError, RuntimeError) as err:
                raise NoGPU(f"TVM's CUDA runtime (libtvm_runtime_cuda.so) does not load: {err}") from None
    if not tvm.cuda(0).exist:
        raise NoGPU("no CUDA device: tvm.cuda(0).exist is False")
    if tvm.base._RUNTIME_ONLY:
        _register_cuda_compile("sm_" + tvm.cuda(0).compute_version.replace(".", ""))
    return tvm


def load_vm(path: Path, dev: Any):
    """A Relax VM for an exported module (the CUDA code is compiled here, at load)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine
    return VirtualMachine(tvm.runtime.load_module(str(path)), dev)


def run_vm(vm: Any, arrays: list[np.ndarray], dev: Any) -> np.ndarray:
    import tvm
    return vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays]).numpy()


def time_tvm(vm: Any, args: list[Any], dev: Any, repeats: int) -> list[float]:
    ftimer = vm.time_evaluator("main", dev, number=1, repeat=repeats, min_repeat_ms=20)
    return [1e3 * t for t in ftimer(*args).results]


def time_torch(fn: Callable[[], object], repeats: int, min_ms: float = 20.0) -> list[float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    inner = max(1, int(min_ms / max(start.elapsed_time(end), 1e-3)))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [min(samples), 0, max(samples)]
    return {"median_ms": statistics.median(samples), "iqr_ms": q[2] - q[0], "min_ms": min(samples)}
