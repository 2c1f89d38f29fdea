"""Default (untuned) GPU schedules: a hand-written direct-convolution rule, dlight for the rest.

TVM's CUDA build needs every PrimFunc bound to blocks and threads; an unscheduled one builds
no kernel (or fails to bind threads). :func:`default_schedule` gives each PrimFunc of a module
a schedule, and raises :class:`GPUScheduleError` naming any function it could not schedule.

:func:`.gpu_conv.schedule_conv_gpu` handles any PrimFunc with a convolution block (dcgraph's ``pad ->
conv -> epilogue`` kernels, and TOPI's ``pad_temp -> conv2d_nchw -> <elementwise>`` after
TVM's own fusion, so that the unfused baseline gets the same convolution schedule):

- the output is tiled per thread block as ``Ct`` output channels x ``Ht`` rows x ``Wt``
  columns (the remaining outer dims, batch and depth, are blocks too). Each thread holds a
  register tile of ``c_reg`` channels x ``w_reg`` consecutive columns; threads run over
  (channels, rows, columns) with the columns fastest, so that a warp's shared-memory reads
  and global writes cover one contiguous range;
- the reduction runs over input channels in chunks of ``rc_in``: per chunk the threads of a
  block copy the chunk's input patch (the zero padding and, for a strided conv, the phase
  split of :mod:`.kernels` are inlined into that copy) and its weights into shared memory,
  synchronise, and accumulate over (input channels, kernel taps) in registers;
- every elementwise stage after the convolution (Deep Control's scale/shift/activation, a
  fused residual add, TVM's fused relu) is inlined into the last one, which is computed
  per thread on the register tile and writes the output once.

Everything else (the two-pass ``map_sum`` + epilogue, pooling, matmuls, adds of a whole
model) gets dlight's rules: ``Matmul``, ``GEMV``, ``Reduction``, ``GeneralReduction``,
first match wins. Before dlight's ``Fallback``, :func:`schedule_reductions_gpu` takes
functions of several reductions (the hoisted shift: per-tap box sums, then a per-sample
matvec), which no other dlight rule accepts and ``Fallback`` would leave to one serial thread
per output: one kernel per reduction, the matvec as a cross-thread reduction.

Scheduled functions carry ``dcgraph.schedule`` (:data:`.schedules.SCHEDULED`): ``"conv"``,
``"reduction"`` for the rules here, ``"dlight.<Rule>"`` for dlight's; all also get
``tirx.is_scheduled`` as dlight sets it. Functions already scheduled (``tirx.is_scheduled``
or ``dcgraph.schedule`` set, e.g. by a tuning record) are left alone.

Measured on an H200 (``benchmarks/results/gpu_kernels.md``, fp32, TF32 off): the conv rule
runs ResNet-18's 3x3 convs 1.2-3.4x slower than cuDNN (geometric mean 1.7x at batch 1, 2.1x
at batch 8); the fused Deep Control kernels add 4-42% to TVM's own conv (the hoisted shift is
three small kernels, so on the GPU the two-pass plan is a little faster).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import Schedule
from tvm.s_tir import dlight as dl

from ..lowering import KERNEL_ATTR
from .common import IS_SCHEDULED, SCHEDULED, marked_scheduled
from .gpu_conv import max_threads_per_block, schedule_conv_gpu, static_extent


class GPUScheduleError(RuntimeError):
    """A PrimFunc that no GPU rule could schedule (it would build no kernel)."""


def _reads_only_at(sch: Schedule, consumer: s_tir.schedule.SBlockRV,
                   producer: s_tir.schedule.SBlockRV) -> bool:
    """True if the spatial block ``consumer`` has the producer's spatial shape (it can run where
    the producer's output element is computed)."""
    p_iters = [iv for iv in sch.get(producer).iter_vars if int(iv.iter_type) == 0]
    c_iters = sch.get(consumer).iter_vars
    if len(p_iters) != len(c_iters):
        return False
    return all(int(a.dom.extent) == int(b.dom.extent) for a, b in zip(p_iters, c_iters, strict=True))


def schedule_reductions_gpu(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """One kernel per root block, for functions of several reductions (the hoisted shift).

    A reduction with few outputs and a long reduction (the per-sample matvec ``hoisted_mean``)
    gets a thread block per output and a cross-thread reduction, with the elementwise block
    after it (``shift``) fused in; short reductions with many outputs (the per-tap box sums)
    get one output per thread. dlight's ``Fallback`` would do the latter for all of them,
    which leaves a long matvec to a few hundred serial threads.
    """
    sch = Schedule(func)
    try:
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    except (s_tir.ScheduleError, ValueError, RuntimeError):
        return None
    max_threads = max_threads_per_block(target)
    if not any(2 in [int(iv.iter_type) for iv in sch.get(b).iter_vars] for b in blocks):
        return None
    fused_into: set[int] = set()
    for i, block in enumerate(blocks):
        if i in fused_into:
            continue
        kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
        loops = sch.get_loops(block)
        if len(loops) != len(kinds) or any(k not in (0, 2) for k in kinds):
            return None
        n_s = kinds.count(0)
        if kinds != [0] * n_s + [2] * (len(kinds) - n_s):
            return None
        ext = [static_extent(sch, lp) for lp in loops]
        spatial = 1
        for e in ext[:n_s]:
            spatial *= e
        red = 1
        for e in ext[n_s:]:
            red *= e
        s_loop = sch.fuse(*loops[:n_s]) if n_s > 1 else (loops[0] if n_s else sch.add_unit_loop(block))
        if n_s == 0:
            spatial = 1
        if red >= 128 and spatial <= 8192:  # long reduction, few outputs: cross-thread
            r_loop = sch.fuse(*loops[n_s:]) if len(loops) - n_s > 1 else loops[n_s]
            threads = min(256, max_threads, 1 << (red.bit_length() - 1))
            ro, ri = sch.split(r_loop, [None, threads])
            sch.reorder(ri, ro)
            sch.bind(s_loop, "blockIdx.x")
            sch.bind(ri, "threadIdx.x")
            nxt = i + 1
            if (nxt < len(blocks) and 2 not in [int(iv.iter_type) for iv in sch.get(blocks[nxt]).iter_vars]
                    and _reads_only_at(sch, blocks[nxt], block)):
                sch.reverse_compute_at(blocks[nxt], s_loop)
                fused_into.add(nxt)
        else:  # one output per thread
            threads = min(256, max_threads, spatial)
            bx, tx = sch.split(s_loop, [None, threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            if n_s < len(loops):
                sch.decompose_reduction(block, loops[n_s])
    return sch.mod["main"].with_attr(SCHEDULED, "reduction").with_attr(IS_SCHEDULED, True)


def _already_scheduled(func: tirx.PrimFunc) -> bool:
    return SCHEDULED in (func.attrs or {}) or marked_scheduled(func)


def binds_threads(func: tirx.PrimFunc) -> bool:
    """True if the scheduled ``func`` launches GPU threads (a loop bound to blockIdx/threadIdx)."""
    found = False

    def visit_for(loop: tirx.For) -> None:
        nonlocal found
        if loop.kind == tirx.ForKind.THREAD_BINDING:
            found = True

    def visit_attr(node: tirx.AttrStmt) -> None:
        nonlocal found
        if node.attr_key == "thread_extent":
            found = True

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit_for), (tirx.AttrStmt, visit_attr)], order="post")
    return found


def dlight_rules() -> list[dl.ScheduleRule]:
    """dlight's GPU rules in the order they are tried."""
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def schedule_func_gpu(func: tirx.PrimFunc, target: tvm.target.Target,
                      rules: list[dl.ScheduleRule] | None = None) -> tirx.PrimFunc | None:
    """The default GPU schedule of one PrimFunc: the conv rule, else the first dlight rule that applies."""
    new = None
    try:
        new = schedule_conv_gpu(func, target)
    except (s_tir.ScheduleError, ValueError, RuntimeError):  # a conv-like block it cannot restructure
        new = None
    if new is not None:
        return new
    rules = rules or dlight_rules()
    for rule in rules:
        if isinstance(rule, dl.gpu.Fallback):  # several reductions: one kernel each, sized to each
            try:
                new = schedule_reductions_gpu(func, target)
            except (s_tir.ScheduleError, ValueError, RuntimeError):
                new = None
            if new is not None:
                return new
        try:
            space = rule.apply(func, target, False)
        except (s_tir.ScheduleError, ValueError, RuntimeError):
            continue
        if space is None:
            continue
        sch = space[0] if isinstance(space, list) else space
        return (sch.mod["main"].with_attr(IS_SCHEDULED, True)
                .with_attr(SCHEDULED, f"dlight.{type(rule).__name__}"))
    return None


def default_schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every not-yet-scheduled PrimFunc of ``mod`` for the GPU ``target``.

    Raises :class:`GPUScheduleError` if a PrimFunc ends up without a schedule or without a
    thread binding (TVM would otherwise build it silently with no kernel, or fail later with
    an unhelpful "did you forget to bind?").
    """
    rules = dlight_rules()
    updates: dict[tvm.ir.GlobalVar, tirx.PrimFunc] = {}
    failed: list[str] = []
    with target:
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _already_scheduled(func):
                continue
            new = schedule_func_gpu(func, target, rules)
            if new is None or not binds_threads(new):
                kind = (func.attrs or {}).get(KERNEL_ATTR, None)
                failed.append(f"{gv.name_hint}" + (f" (dcgraph kernel {kind})" if kind else ""))
                continue
            updates[gv] = new
    if failed:
        raise GPUScheduleError(
            f"no GPU schedule for {', '.join(failed)}: neither the conv rule nor dlight's rules "
            f"({', '.join(type(r).__name__ for r in rules)}) apply; it would build no kernel")
    for gv, func in updates.items():
        mod[gv] = func
    return mod
