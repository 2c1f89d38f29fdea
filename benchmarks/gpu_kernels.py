"""dcgraph's fused Deep Control kernel on CUDA against PyTorch (cuDNN) on ResNet-18 conv shapes.

Rows per (shape, batch), forward, fp32, conv + Deep Control + relu:

- ``torch_conv``: PyTorch's conv alone (cuDNN, TF32 off), the floor users know;
- ``torch_plain``: PyTorch's conv, then Deep Control as plain ops (mean, scale, shift, relu);
- ``tvm_fused``: dcgraph's fused kernels with the default GPU schedule (:mod:`dcgraph.backends.
  tvm.gpu`): the hoisted per-sample shift, then the conv with the scale/shift/relu epilogue;
- ``tvm_two_pass``: dcgraph's two-pass form (conv, then one mean + epilogue kernel);
- ``tvm_conv``: TVM's own conv2d alone with the same conv schedule (so ``tvm_fused / tvm_conv``
  is the cost of Deep Control inside TVM, and ``tvm_conv / torch_conv`` the schedule's gap).

Every row is checked against :func:`dcgraph.reference.conv_deep_control` (float64, on the CPU)
before it is timed; a row that fails is reported, not timed. GPU times are medians of
``--repeats`` samples, each the mean of several back-to-back calls after warm-up
(``time_evaluator`` for TVM, CUDA events for PyTorch).

Compiling needs the full TVM (and no GPU); running needs a GPU and only TVM's runtime. So the
script has three modes:

    python benchmarks/gpu_kernels.py build   # here: compile every module, export to build/gpu_kernels/
    python benchmarks/gpu_kernels.py run     # on the GPU machine: load, check, time, write results
    python benchmarks/gpu_kernels.py         # both, where one machine has TVM's compiler and a GPU

``build`` also exports the shared test cases (``tests/cases.py``, both plans, batch 1 and 4)
for ``tests/backends/test_cuda_run.py``, and copies TVM's Python package without its compiler
library into ``build/gpu_kernels/site`` (about 15 MB), so that the GPU machine needs no TVM
install: put the ``apache-tvm-ffi`` wheel for its Python into ``build/gpu_kernels/wheels``
(``build`` prints the ``pip download`` command). The CUDA code in the exported modules is
compiled when they are loaded: by NVRTC (needs the ``cuda-bindings`` and ``nvidia-cuda-nvrtc``
packages) or, with ``TVM_CUDA_COMPILE_MODE=nvcc``, by ``nvcc`` on the PATH.
Results: ``benchmarks/results/gpu_kernels.{json,md}``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make tests.cases and benchmarks.common importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESNET18, geomean, machine_info, write_results  # noqa: E402
from tests.cases import CASES, ConvCase  # noqa: E402

ARTIFACTS = ROOT / "build" / "gpu_kernels"
# (name, C_in, C_out, input H=W, kernel, stride): the distinct convs of ResNet-18 past the stem
SHAPES = [s for s in RESNET18 if s[0] != "conv1"]
# Larger than the shared cases, so that the GPU conv schedule keeps its full register tiles
# (4 channels x 2 columns per thread) and loops over several input-channel chunks; the shared
# cases are so small that it shrinks the tiles to one output per thread.
TILE_CASES = [
    ConvCase("tile_w2", 4, 16, 32, (64, 64), (3, 3), padding=(1, 1)),
    ConvCase("tile_w2_stride2", 8, 12, 16, (128, 128), (3, 3), stride=(2, 2), padding=(1, 1), bias=True,
             act="silu"),
]
BENCH_BATCHES = (1, 8)
CASE_BATCHES = (1, 4)
PLANS = ("hoisted", "two_pass")
TVM_ROWS = ("tvm_fused", "tvm_two_pass", "tvm_conv")
TORCH_ROWS = ("torch_conv", "torch_plain")
ROWS = (*TORCH_ROWS, *TVM_ROWS)
RTOL = 1e-4  # max abs error relative to the reference's max abs value
FFI_WHEEL_HELP = (
    "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
    "--platform manylinux_2_28_x86_64 -d build/gpu_kernels/wheels apache-tvm-ffi==0.1.14.post1")


class NoGPU(RuntimeError):
    """No CUDA device (or no TVM CUDA runtime) on this machine."""


# ----------------------------------------------------------------------------- shared helpers

def reference_module() -> ModuleType:
    """:mod:`dcgraph.reference`; loaded from its file if the package cannot be imported here
    (the GPU machine may have another torch than the one the custom ops were written for)."""
    try:
        from dcgraph import reference
        return reference
    except Exception:  # any import failure of the package: the oracle itself only needs torch
        spec = importlib.util.spec_from_file_location("dcgraph_reference", ROOT / "dcgraph" / "reference.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def case_with_batch(case: ConvCase, batch: int) -> ConvCase:
    return dataclasses.replace(case, name=f"{case.name}-b{batch}", batch=batch)


def case_names() -> list[tuple[ConvCase, str, str]]:
    """``(case at its batch, plan, artifact stem)`` for every shared case, plan and batch (1, 4),
    then the :data:`TILE_CASES` at their own batch."""
    shared = [(case_with_batch(c, b), plan, f"{c.name}-{plan}-b{b}")
              for c in CASES for plan in PLANS for b in CASE_BATCHES]
    return shared + [(c, plan, f"{c.name}-{plan}-b{c.batch}") for c in TILE_CASES for plan in PLANS]


def case_arrays(case: ConvCase) -> tuple[list[np.ndarray], np.ndarray]:
    """float32 inputs (x, weight, [bias], a, g, b) and the float64 reference output."""
    t = case.tensors(torch.float64)
    names = [k for k in ("x", "weight", "bias", "a", "g", "b") if t[k] is not None]
    want = reference_module().conv_deep_control(
        t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"], act=case.act, **case.conv_kwargs())
    return [t[k].float().numpy() for k in names], want.numpy()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-12))


def bench_tensors(cin: int, cout: int, size: int, k: int, batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(batch, cin, size, size, generator=gen),
        "weight": torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5,
        "a": 0.5 + torch.rand(cout, generator=gen),
        "g": 0.5 + torch.rand(cout, generator=gen),
        "b": torch.randn(cout, generator=gen) * 0.5,
    }


def bench_stem(kind: str, layer: str, batch: int) -> str:
    return f"{kind}-{layer}-b{batch}"


# ----------------------------------------------------------------------------- build (TVM compiler)

def _relax_module(kind: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], c_out: int,
                  bias: bool, act: str, conv: dict[str, Any]):
    """The Relax module for one row: inputs (x, weight, [bias], a, g, b), or (x, weight) for ``tvm_conv``."""
    from tvm import relax

    from dcgraph.backends.tvm.lowering import emit_conv_deep_control

    def var(name: str, shape: tuple[int, ...]) -> relax.Var:
        return relax.Var(name, relax.TensorType(shape, "float32"))

    x, w = var("x", x_shape), var("weight", w_shape)
    params = [x, w]
    bias_v = var("bias", (c_out,)) if bias else None
    if kind != "tvm_conv":
        params += [*([bias_v] if bias_v is not None else []), var("a", (c_out,)), var("g", (c_out,)),
                   var("b", (c_out,))]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            if kind == "tvm_conv":
                out = bb.emit(relax.op.nn.conv2d(x, w, strides=conv["stride"], padding=conv["padding"]))
            else:
                a, g, b = params[-3:]
                plan = "hoisted" if kind in ("tvm_fused", "hoisted") else "two_pass"
                out = emit_conv_deep_control(bb, x, w, bias_v, a, g, b, act=act, plan=plan, **conv)
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    return bb.get()


def case_module(case: ConvCase, plan: str):
    """The Relax module of a shared case (inputs as :func:`case_arrays`)."""
    t = case.tensors()
    return _relax_module(plan, tuple(t["x"].shape), tuple(t["weight"].shape), case.out_channels,
                         case.bias, case.act, case.conv_kwargs())


def bench_module(kind: str, cin: int, cout: int, size: int, k: int, stride: int, batch: int):
    conv = {"stride": stride, "padding": k // 2, "dilation": 1, "groups": 1}
    return _relax_module(kind, (batch, cin, size, size), (cout, cin, k, k), cout, False, "relu", conv)


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


def build(out: Path = ARTIFACTS, arch: str = "sm_90", shapes: list[tuple] | None = None,
          cases: bool = True, say: Callable[[str], None] = print) -> dict:
    """Compile and export every benchmark row and shared case to ``out``; return the manifest."""
    import tvm

    target = cuda_target(arch)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    entries: list[str] = []
    for layer, cin, cout, size, k, stride in shapes or SHAPES:
        for batch in BENCH_BATCHES:
            for kind in TVM_ROWS:
                stem = bench_stem(kind, layer, batch)
                compile_cuda(bench_module(kind, cin, cout, size, k, stride, batch), target).export_library(
                    str(out / "bench" / f"{stem}.so"))
                entries.append(f"bench/{stem}.so")
    if cases:
        for case, plan, stem in case_names():
            compile_cuda(case_module(case, plan), target).export_library(str(out / "cases" / f"{stem}.so"))
            entries.append(f"cases/{stem}.so")
    pack_runtime(out)
    manifest = {"tvm": tvm.__version__, "target": str(target.attrs.get("arch")), "entries": entries,
                "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "seconds": round(time.perf_counter() - t0, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    wheels = sorted(glob.glob(str(out / "wheels" / "apache_tvm_ffi-*.whl")))
    say(f"built {len(entries)} modules for cuda {manifest['target']} in {manifest['seconds']} s into {out}")
    if not wheels:
        say(f"no apache-tvm-ffi wheel in {out / 'wheels'}; for a Python 3.12 GPU machine:\n"
            f"  {FFI_WHEEL_HELP}")
    return manifest


# ----------------------------------------------------------------------------- run (TVM runtime + GPU)

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


def _time_tvm(vm: Any, args: list[Any], dev: Any, repeats: int) -> list[float]:
    ftimer = vm.time_evaluator("main", dev, number=1, repeat=repeats, min_repeat_ms=20)
    return [1e3 * t for t in ftimer(*args).results]


def _time_torch(fn: Callable[[], object], repeats: int, min_ms: float = 20.0) -> list[float]:
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


def _summary(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [min(samples), 0, max(samples)]
    return {"median_ms": statistics.median(samples), "iqr_ms": q[2] - q[0], "min_ms": min(samples)}


def _why(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1][:160] if lines else ''}"


def bench_row(layer: str, cin: int, cout: int, size: int, k: int, stride: int, batch: int,
              repeats: int, art: Path, dev: Any, torch_cuda: bool) -> dict:
    """Check and time every variant of one (shape, batch)."""
    import torch.nn.functional as F

    R = reference_module()
    t = bench_tensors(cin, cout, size, k, batch)
    pad = k // 2
    d = {key: v.double() for key, v in t.items()}
    want = R.conv_deep_control(d["x"], d["weight"], None, d["a"], d["g"], d["b"], stride, pad, act="relu")
    conv_want = F.conv2d(d["x"], d["weight"], None, stride, pad)
    row: dict[str, Any] = {"layer": layer, "batch": batch, "shape": f"{cin}->{cout} {k}x{k}/{stride} @{size}",
                           "failed": {}, "errors": {}}
    if torch_cuda:
        g = {key: v.cuda() for key, v in t.items()}

        def conv() -> torch.Tensor:
            return F.conv2d(g["x"], g["weight"], None, stride, pad)

        def plain() -> torch.Tensor:
            y = F.conv2d(g["x"], g["weight"], None, stride, pad)
            m = y.mean(dim=(2, 3), keepdim=True)
            col = (1, -1, 1, 1)
            return F.relu(g["g"].view(col) * (y - g["a"].view(col) * m) + g["b"].view(col))

        with torch.no_grad():
            for kind, fn, ref in (("torch_conv", conv, conv_want), ("torch_plain", plain, want)):
                err = relative_error(fn().double().cpu().numpy(), ref.numpy())
                row["errors"][kind] = err
                if not err < RTOL:
                    row["failed"][kind] = f"wrong result: relative error {err:.1e}"
                    continue
                for m, v in _summary(_time_torch(fn, repeats)).items():
                    row[f"{kind}_{m}"] = v
    else:
        for kind in TORCH_ROWS:
            row["failed"][kind] = "not available (CPU-only torch)"
    import tvm
    for kind in TVM_ROWS:
        path = art / "bench" / f"{bench_stem(kind, layer, batch)}.so"
        try:
            if not path.exists():
                raise FileNotFoundError(f"{path} (run `python benchmarks/gpu_kernels.py build` first)")
            vm = load_vm(path, dev)
            names = ["x", "weight"] if kind == "tvm_conv" else ["x", "weight", "a", "g", "b"]
            args = [tvm.runtime.tensor(t[n].numpy(), dev) for n in names]
            got = vm["main"](*args).numpy()
            err = relative_error(got, (conv_want if kind == "tvm_conv" else want).numpy())
            row["errors"][kind] = err
            if not err < RTOL:
                row["failed"][kind] = f"wrong result: relative error {err:.1e}"
                continue
            for m, v in _summary(_time_tvm(vm, args, dev, repeats)).items():
                row[f"{kind}_{m}"] = v
        except Exception as e:  # a row that cannot load or run is reported; the others still run
            row["failed"][kind] = _why(e)
    for kind in ("tvm_fused", "tvm_two_pass", "tvm_conv", "torch_plain"):
        if f"{kind}_median_ms" in row and "torch_conv_median_ms" in row:
            row[f"{kind}_vs_torch_conv"] = row[f"{kind}_median_ms"] / row["torch_conv_median_ms"]
    if "tvm_fused_median_ms" in row and "torch_plain_median_ms" in row:
        row["tvm_fused_vs_torch_plain"] = row["tvm_fused_median_ms"] / row["torch_plain_median_ms"]
    if "tvm_fused_median_ms" in row and "tvm_conv_median_ms" in row:
        row["tvm_fused_vs_tvm_conv"] = row["tvm_fused_median_ms"] / row["tvm_conv_median_ms"]
    return row


def _markdown(rows: list[dict], info: dict, repeats: int) -> str:
    def cell(r: dict, kind: str) -> str:
        if kind in r["failed"]:
            return "n/a" if "not available" in r["failed"][kind] else "FAILED"
        return f"{r[kind + '_median_ms']:.4f}"

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.2f}x" if key in r else "-"

    lines = [
        f"Forward, fp32 (TF32 off), {info.get('gpu', 'GPU')}, TVM {info.get('tvm', '?')} "
        f"(dcgraph default GPU schedule, untuned), torch {info['torch']} "
        f"(cuDNN {info.get('cudnn', 'n/a')}), {info['date']}; median ms of {repeats} samples.",
        "",
        "| layer | batch | conv | torch conv | torch conv+DC | tvm fused | tvm two-pass | tvm conv "
        "| fused / torch conv | fused / torch conv+DC | fused / tvm conv |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['batch']} | {r['shape']} | "
                     + " | ".join(cell(r, k) for k in ROWS)
                     + f" | {ratio(r, 'tvm_fused_vs_torch_conv')} | {ratio(r, 'tvm_fused_vs_torch_plain')} "
                     f"| {ratio(r, 'tvm_fused_vs_tvm_conv')} |")
    lines.append("")
    for batch in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == batch]
        parts = []
        for key, label in (("tvm_fused_vs_torch_conv", "fused / torch conv"),
                           ("tvm_fused_vs_torch_plain", "fused / torch conv+DC"),
                           ("torch_plain_vs_torch_conv", "torch conv+DC / torch conv"),
                           ("tvm_fused_vs_tvm_conv", "fused / tvm conv"),
                           ("tvm_conv_vs_torch_conv", "tvm conv / torch conv")):
            vals = [r[key] for r in sel if key in r]
            if vals:
                parts.append(f"{label} **{geomean(vals):.2f}x**")
        lines.append(f"- batch {batch}, geometric means: " + (", ".join(parts) or "none measured"))
    notes = sorted({v for r in rows for v in r["failed"].values() if "not available" in v})
    for note in notes:
        lines.append(f"- PyTorch rows {note}: install a CUDA build of torch to measure them")
    for r in rows:
        for kind, why in r["failed"].items():
            if "not available" not in why:
                lines.append(f"- FAILED {kind} on {r['layer']} batch {r['batch']}: {why}")
    return "\n".join(lines)


def run(art: Path = ARTIFACTS, repeats: int = 15, quick: bool = False, stem: str | None = None) -> int:
    """Load the modules exported by :func:`build`, check and time them; write the results."""
    tvm = cuda_runtime()
    dev = tvm.cuda(0)
    torch_cuda = torch.cuda.is_available()
    if torch_cuda:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    info = machine_info()
    info.update({"tvm": tvm.__version__, "gpu": str(dev.device_name), "compute": str(dev.compute_version),
                 "cuda_compile_mode": os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc"),
                 "cudnn": str(torch.backends.cudnn.version()) if torch_cuda else None})
    manifest = art / "manifest.json"
    if manifest.exists():
        info["built"] = json.loads(manifest.read_text())
        info["built"].pop("entries", None)
    shapes = [s for s in SHAPES if not quick or s[0] in ("layer1", "layer3", "layer4")]
    rows = []
    t0 = time.perf_counter()
    for batch in BENCH_BATCHES:
        for shape in shapes:
            r = bench_row(*shape, batch, repeats, art, dev, torch_cuda)
            rows.append(r)
            done = ", ".join(f"{k} {r[k + '_median_ms']:.4f}" for k in ROWS if k + "_median_ms" in r)
            print(f"[{time.perf_counter() - t0:5.1f}s] {r['layer']} b{batch}: {done}"
                  + (f"; failed: {r['failed']}" if r["failed"] else ""), flush=True)
    md = _markdown(rows, info, repeats)
    paths = write_results(stem or ("gpu_kernels_quick" if quick else "gpu_kernels"),
                          {"machine": info, "repeats": repeats, "rows": rows}, md)
    print(md)
    print(f"\nwrote {paths[0]} and {paths[1]}")
    hard = [k for r in rows for k, v in r["failed"].items() if "not available" not in v]
    return 1 if hard else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("build", "run", "all"), default="all",
                        help="build: compile and export (no GPU needed); run: load, check and time "
                             "(GPU, TVM runtime only); all (default): both")
    parser.add_argument("--dir", type=Path, default=ARTIFACTS, help=f"artifact folder (default {ARTIFACTS})")
    parser.add_argument("--arch", default="sm_90", help="CUDA arch to build for (default sm_90)")
    parser.add_argument("--repeats", type=int, default=15, help="timed samples per row (default 15)")
    parser.add_argument("--quick", action="store_true", help="run: three shapes only")
    parser.add_argument("--no-cases", action="store_true", help="build: skip the shared test cases")
    args = parser.parse_args(argv)
    if args.mode in ("build", "all"):
        build(args.dir, args.arch, cases=not args.no_cases)
    if args.mode in ("run", "all"):
        try:
            return run(args.dir, args.repeats, args.quick)
        except NoGPU as err:
            print(f"gpu_kernels: cannot run here: {err}. Build here with `python benchmarks/gpu_kernels.py "
                  "build`, then run `python benchmarks/gpu_kernels.py run` on a machine with a CUDA GPU.",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
