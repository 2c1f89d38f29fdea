"""CUDA code generation without a GPU: every shared case, both plans, builds for sm_90 and sm_80
with dcgraph's default GPU schedules, the conv kernel has the epilogue fused in and runs on
threads, and nvcc compiles the generated source to a cubin.

Running the kernels is ``test_cuda_run.py``'s job (it needs a GPU). This module takes ~30 s.
"""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

tvm = pytest.importorskip("tvm")
if tvm.base._RUNTIME_ONLY:
    pytest.skip("TVM's compiler library is not available (runtime-only TVM)", allow_module_level=True)

from tvm import relax  # noqa: E402
from tvm.support import nvcc  # noqa: E402

from dcgraph.backends.tvm import targets  # noqa: E402
from dcgraph.backends.tvm.pipeline import kernel_report, optimize, relax_pipeline  # noqa: E402
from dcgraph.backends.tvm.schedules import (  # noqa: E402
    SCHEDULED,
    gpu,
    gpu_conv,
)
from dcgraph.testing import CASES  # noqa: E402
from tests.backends.tvm_cases import case_module  # noqa: E402

ARCHS = ("sm_90", "sm_80")
PLANS = ("hoisted", "two_pass")
CONV_KERNEL = {"hoisted": "dc_conv", "two_pass": "dc_conv_raw"}
KERNEL_RE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\((.*)\) \{$', re.M)
HAVE_NVCC = shutil.which("nvcc") is not None


def target(arch: str) -> tvm.target.Target:
    return targets.resolve("cuda" if arch == "sm_90" else {**targets.CUDA, "arch": arch})


def cuda_source(mod: tvm.IRModule, tgt: tvm.target.Target) -> str:
    ex = tvm.compile(mod, target=tgt, relax_pipeline=relax_pipeline(tgt))
    (host,) = ex.mod.imports
    (device,) = host.imports
    assert device.kind == "cuda"
    return device.inspect_source()


def kernels(src: str) -> dict[str, tuple[int | None, str, str]]:
    """kernel name -> (launch bound, parameter list, body)."""
    out = {}
    matches = list(KERNEL_RE.finditer(src))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(src)
        out[m.group(2)] = (int(m.group(1)) if m.group(1) else None, m.group(3), src[m.end():end])
    return out


def nvcc_cubin(src: str, arch: str = "sm_90") -> bytes:
    with target(arch):  # TVM's helper reads the arch from the current target
        return bytes(nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc"))


@pytest.fixture(scope="module")
def sources() -> dict[tuple[str, str, str], str]:
    """CUDA source of every (case, plan, arch): built once, shared by the tests below."""
    out = {}
    for case in CASES:
        for plan in PLANS:
            mod, _, _ = case_module(case, plan)
            for arch in ARCHS:
                out[case.name, plan, arch] = cuda_source(mod, target(arch))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conv_kernel_has_the_epilogue_fused_and_runs_on_threads(sources, case, plan, arch):
    ks = kernels(sources[case.name, plan, arch])
    name = CONV_KERNEL[plan]
    conv = [k for k in ks if k == f"{name}_kernel" or k.startswith(f"{name}_kernel_")]
    assert conv == [f"{name}_kernel"], f"expected one conv kernel, got {sorted(ks)}"
    bound, params, body = ks[f"{name}_kernel"]
    assert "threadIdx.x" in body and "blockIdx.x" in body
    assert "epilogue_ptr[" in body, "the conv kernel must write the final output (epilogue fused in)"
    assert not any("conv" in p for p in re.findall(r"float\* __restrict__ (\w+)", params)), \
        "the raw conv output must stay in registers, not be a kernel argument"
    if plan == "hoisted":  # scale and per-sample shift are read by the conv kernel itself
        assert "g_ptr" in params and "lv_ptr" in params
    assert bound is None or bound <= 1024
    assert all(b is None or b <= 1024 for b, _, _ in ks.values())


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_kernel_gets_a_gpu_schedule(case, plan):
    mod, _, _ = case_module(case, plan)
    opt = optimize(mod, target("sm_90"))
    report = {k.name: k for k in kernel_report(opt)}
    assert report[CONV_KERNEL[plan]].schedule == "default"
    assert all(k.schedule != "none" for k in report.values()), report
    conv = opt[CONV_KERNEL[plan]]
    assert conv.attrs[SCHEDULED] == "conv"
    assert bool(conv.attrs[gpu.IS_SCHEDULED])
    for _, func in opt.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert gpu.binds_threads(func)


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc is not installed (CUDA toolkit), cannot compile to cubin")
def test_nvcc_compiles_every_generated_source_for_sm90(sources):
    """nvcc turns each (case, plan) source into an sm_90 cubin (an ELF file)."""
    keys = [k for k in sources if k[2] == "sm_90"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        cubins = dict(zip(keys, pool.map(lambda k: nvcc_cubin(sources[k]), keys), strict=True))
    for key, cubin in cubins.items():
        assert cubin[:4] == b"\x7fELF", key


def _tvm_conv_module(kind: str) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 16, 14, 14), "float32"))
    w = relax.Var("w", relax.TensorType((32, 16, 3, 3), "float32"))
    r = relax.Var("r", relax.TensorType((2, 32, 7, 7), "float32"))
    with bb.function("main", [x, w, r]):
        with bb.dataflow():
            y = relax.op.nn.conv2d(x, w, strides=2, padding=1)
            if kind == "relu_add":
                y = relax.op.nn.relu(relax.op.add(y, r))
            gv = bb.emit_output(bb.emit(y))
        bb.emit_func_output(gv)
    return bb.get()


@pytest.mark.parametrize("kind", ["alone", "relu_add"])
def test_tvm_legalized_conv_gets_the_same_conv_schedule(kind):
    """The unfused baseline: TVM's conv2d (+ FuseOps' elementwise ops) gets the conv rule."""
    tgt = target("sm_90")
    opt = optimize(_tvm_conv_module(kind), tgt)
    convs = [f for gv, f in opt.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert len(convs) == 1 and convs[0].attrs[SCHEDULED] == "conv"
    ks = kernels(cuda_source(_tvm_conv_module(kind), tgt))
    assert len(ks) == 1, sorted(ks)  # one kernel: the elementwise ops are fused into the conv
    (_, _, body), = ks.values()
    assert "__shared__" in body and "threadIdx.x" in body
    if HAVE_NVCC:
        assert nvcc_cubin(cuda_source(_tvm_conv_module(kind), tgt))[:4] == b"\x7fELF"


def test_whole_model_ops_get_dlight_schedules():
    """conv -> relu -> max pool -> global mean -> dense -> add: every kernel scheduled and built."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 16, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 8, 3, 3), "float32"))
    fc = relax.Var("fc", relax.TensorType((16, 10), "float32"))
    bias = relax.Var("bias", relax.TensorType((10,), "float32"))
    with bb.function("main", [x, w, fc, bias]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1)))
            y = bb.emit(relax.op.nn.max_pool2d(y, pool_size=2, strides=2))
            y = bb.emit(relax.op.mean(y, axis=[2, 3]))
            y = bb.emit(relax.op.add(relax.op.matmul(y, fc), bias))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    tgt = target("sm_90")
    opt = optimize(bb.get(), tgt)
    schedules = {gv.name_hint: str(f.attrs[SCHEDULED]) for gv, f in opt.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc)}
    assert any(s == "conv" for s in schedules.values()), schedules
    assert all(s == "conv" or s.startswith("dlight.") or s == "reduction" for s in schedules.values())
    src = cuda_source(bb.get(), tgt)
    assert len(kernels(src)) >= 3
    if HAVE_NVCC:
        assert nvcc_cubin(src)[:4] == b"\x7fELF"


def test_max_threads_per_block_is_respected():
    case = next(c for c in CASES if c.name == "basic3x3")
    mod, _, _ = case_module(case, "hoisted")
    tgt = targets.resolve({**targets.CUDA, "max_threads_per_block": 32, "max_num_threads": 32})
    ks = kernels(cuda_source(mod, tgt))
    assert all(b is not None and b <= 32 for b, _, _ in ks.values()), {k: v[0] for k, v in ks.items()}


def test_tiling_divides_and_fits():
    for n, c, h, w, rc in [(1, 64, 56, 56, 64), (8, 512, 7, 7, 512), (1, 5, 7, 9, 3), (2, 6, 1, 1, 3)]:
        for max_threads in (1024, 64, 32):
            t = gpu_conv.pick_tiling(n, c, h, w, rc, max_threads)
            assert c % (t.c_thr * t.c_reg) == 0 and h % t.h_thr == 0 and w % (t.w_thr * t.w_reg) == 0
            assert rc % t.rc_in == 0 and 1 <= t.threads <= min(256, max_threads)


def test_unscheduled_function_raises_a_clear_error(monkeypatch):
    """A function no rule binds to threads would build no kernel: default_schedule says so."""
    monkeypatch.setattr(gpu, "schedule_func_gpu", lambda func, target, rules=None: func)
    case = next(c for c in CASES if c.name == "basic3x3")
    mod, _, _ = case_module(case, "hoisted")
    # the error crosses TVM's pass machinery, which re-raises it as its base class, RuntimeError
    with pytest.raises(RuntimeError, match="no GPU schedule for dc_conv"):
        optimize(mod, target("sm_90"))


@pytest.mark.parametrize("plan", PLANS)
def test_register_tile_is_dense(plan):
    """Each thread's accumulators are exactly its c_reg x w_reg outputs, and the fused epilogue
    writes only those (a strided tile made TVM size it to the bounding box and write columns the
    thread never computed: a race that gave wrong results on a GPU)."""
    from dcgraph.testing import GPU_TILE_CASES

    case = GPU_TILE_CASES[0]
    t = gpu_conv.pick_tiling(case.batch, case.out_channels, *case.size, case.in_channels, 1024)
    assert t.w_reg > 1 and t.c_reg > 1, t  # the case must keep a multi-column register tile
    src = cuda_source(case_module(case, plan)[0], target("sm_90"))
    _, _, body = kernels(src)[f"{CONV_KERNEL[plan]}_kernel"]
    assert f"float conv_local_ptr[{t.c_reg * t.w_reg}];" in body
    loops = re.findall(r"for \(int \w+ = 0; \w+ < (\d+); \+\+\w+\) \{\n(?:.*\n){0,3}?\s*epilogue_ptr\[", body)
    assert loops and all(int(n) <= max(t.c_reg, t.w_reg) for n in loops), loops
