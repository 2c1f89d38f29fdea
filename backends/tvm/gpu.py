"""Default (untuned) GPU schedules: a hand-written direct-convolution rule, dlight for the rest.

TVM's CUDA build needs every PrimFunc bound to blocks and threads; an unscheduled one builds
no kernel (or fails to bind threads). :func:`default_schedule` gives each PrimFunc of a module
a schedule, and raises :class:`GPUScheduleError` naming any function it could not schedule.

:func:`schedule_conv_gpu` handles any PrimFunc with a convolution block (dcgraph's ``pad ->
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

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import Schedule
from tvm.s_tir import dlight as dl

from .lowering import KERNEL_ATTR
from .schedules import SCHEDULED, conv_stages, find_conv_block

IS_SCHEDULED = "tirx.is_scheduled"  # dlight's and MetaSchedule's mark (TVM 0.27 spelling)
_IS_SCHEDULED_OLD = "tir.is_scheduled"
DEFAULT_SHARED_BYTES = 48 * 1024  # without the opt-in carve-out, on every CUDA GPU since Kepler
MIN_BLOCKS = 256  # about two waves on a 132-SM H100/H200: shrink register tiles below this


class GPUScheduleError(RuntimeError):
    """A PrimFunc that no GPU rule could schedule (it would build no kernel)."""


@dataclass(frozen=True)
class ConvTiling:
    """Tile sizes of :func:`schedule_conv_gpu` (per block: ``c_thr*c_reg`` channels, ``h_thr``
    rows, ``w_thr*w_reg`` columns; ``rc_in`` input channels per shared-memory chunk)."""

    c_thr: int
    c_reg: int
    h_thr: int
    w_thr: int
    w_reg: int
    rc_in: int
    shared: bool = True

    @property
    def threads(self) -> int:
        return self.c_thr * self.h_thr * self.w_thr


def max_threads_per_block(target: tvm.target.Target) -> int:
    """The target's ``max_threads_per_block`` (or ``max_num_threads``), 1024 for CUDA otherwise."""
    return int(dl.base.max_threads_per_block(target))


def max_shared_bytes(target: tvm.target.Target) -> int:
    value = target.attrs.get("max_shared_memory_per_block", None)
    return int(value) if value is not None else DEFAULT_SHARED_BYTES


def _ext(sch: Schedule, loop: s_tir.schedule.LoopRV) -> int:
    ext = sch.get(loop).extent
    if not isinstance(ext, tirx.IntImm):
        raise ValueError("the GPU conv rule needs static loop extents")
    return int(ext)


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (>= 1)."""
    for d in range(min(n, max(limit, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def _first_divisor(n: int, choices: tuple[int, ...]) -> int:
    return next((c for c in choices if n % c == 0), 1)


def pick_tiling(n_outer: int, c: int, h: int, w: int, rc: int, max_threads: int) -> ConvTiling:
    """Tile sizes for an output of ``n_outer`` (batch x depth) x ``c`` channels x ``h`` x ``w``
    with an ``rc``-long input-channel reduction; every factor divides its dim (no tails)."""
    w_thr = _divisor_at_most(w, min(32, max_threads))
    w_reg = 2 if (w // w_thr) % 2 == 0 else 1
    h_thr = _divisor_at_most(h, max(1, min(64, max_threads) // w_thr))
    spatial = w_thr * h_thr
    c_reg = _first_divisor(c, (4, 2))
    budget = max(1, min(256, max_threads) // spatial)
    c_thr = _divisor_at_most(c // c_reg, budget)

    def blocks(c_reg_: int, w_reg_: int, c_thr_: int) -> int:
        return n_outer * (c // (c_thr_ * c_reg_)) * (h // h_thr) * (w // (w_thr * w_reg_))

    # small problems (batch 1, deep layers): fewer outputs per thread, then fewer threads per
    # block (down to about two warps), for more blocks
    while blocks(c_reg, w_reg, c_thr) < MIN_BLOCKS:
        if w_reg > 1:
            w_reg = 1
        elif c_reg > 1:
            c_reg //= 2
            c_thr = _divisor_at_most(c // c_reg, budget)
        elif c_thr > 1 and spatial * c_thr >= 128:
            c_thr = _divisor_at_most(c, c_thr // 2)
        else:
            break
    rc_in = _first_divisor(rc, (8, 4, 2)) if rc >= 8 else rc
    return ConvTiling(c_thr, c_reg, h_thr, w_thr, w_reg, rc_in)


def _uses_var(expr: tirx.Expr, var: tirx.Var) -> bool:
    found = False

    def visit(v: tirx.Var) -> None:
        nonlocal found
        found = found or v.same_as(var)

    tvm_ffi.structural_walk(expr, [(tirx.Var, visit)], order="post")
    return found


def _read_index(sch: Schedule, block: s_tir.schedule.SBlockRV, depends_on_batch: bool) -> int | None:
    """Index of the conv block's data read (indices use the batch iterator) or weight read (not)."""
    body = sch.get(block)
    batch_var = body.iter_vars[0].var
    for i, region in enumerate(body.reads):
        uses = any(_uses_var(r.min, batch_var) for r in region.region)
        if uses == depends_on_batch and not region.source.same_as(body.writes[0].source):
            return i
    return None


def _cooperative_fetch(sch: Schedule, block: s_tir.schedule.SBlockRV, depth: int, threads: int) -> int:
    """Spread a shared-memory copy block over the ``threads`` threads of the thread block; return
    the number of elements it copies (the compacted size of its shared buffer)."""
    loops = sch.get_loops(block)[depth:]
    size = 1
    for loop in loops:
        size *= _ext(sch, loop)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, tx = sch.split(fused, [None, threads])
    sch.bind(tx, "threadIdx.x")
    return size


def _apply_conv(sch: Schedule, tiling: ConvTiling) -> int | None:
    """Apply the conv schedule with ``tiling``; return the shared-memory bytes it uses, or None
    if ``sch`` has no convolution block it can handle."""
    stages = conv_stages(sch)
    if stages is None:
        return None
    conv, producers, consumers = stages
    data_idx = _read_index(sch, conv, True)
    weight_idx = _read_index(sch, conv, False)
    if data_idx is None or weight_idx is None:
        return None

    kinds = [int(iv.iter_type) for iv in sch.get(conv).iter_vars]
    n_spatial = kinds.count(0)
    loops = sch.get_loops(conv)
    spatial, reduce_ = loops[:n_spatial], loops[n_spatial:]
    outer = [spatial[0], *spatial[2:-2]] if n_spatial >= 4 else [spatial[0]]
    c_loop, w_loop = spatial[1], spatial[-1]
    h_loop = spatial[-2] if n_spatial >= 4 else None
    t = tiling
    cb, ct, cr = sch.split(c_loop, [None, t.c_thr, t.c_reg])
    # each thread's columns are consecutive: the register tile (and the epilogue computed on it)
    # must be a dense box, or TVM sizes it to the bounding box and writes columns it never computed
    wb, wt, wr = sch.split(w_loop, [None, t.w_thr, t.w_reg])
    hb, ht = sch.split(h_loop, [None, t.h_thr]) if h_loop is not None else (None, None)
    ro, ri = sch.split(reduce_[0], [None, t.rc_in])
    taps = reduce_[1:]
    block_loops = [*outer, cb, *([hb] if hb is not None else []), wb]
    thread_loops = [ct, *([ht] if ht is not None else []), wt]
    sch.reorder(*block_loops, *thread_loops, ro, ri, *taps, cr, wr)
    bx = sch.fuse(*block_loops)
    tx = sch.fuse(*thread_loops)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")

    if consumers:
        out = consumers[-1]
        sch.reverse_compute_at(out, tx, preserve_unit_loops=True)
        sch.set_scope(conv, 0, "local")
    else:  # the conv writes the function's output: accumulate in registers, then copy out
        out = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(out, tx, preserve_unit_loops=True)

    shared_bytes = 0
    if t.shared:
        data_sh = sch.cache_read(conv, data_idx, "shared")
        weight_sh = sch.cache_read(conv, weight_idx, "shared")
        for cache in (data_sh, weight_sh):
            sch.compute_at(cache, ro, preserve_unit_loops=True)
            elems = _cooperative_fetch(sch, cache, 3, t.threads)  # below (bx, tx, ro)
            shared_bytes += elems * tvm.runtime.DataType(sch.get(cache).writes[0].source.dtype).bits // 8
    for block in reversed(producers):  # zero padding / phase split: into the (shared) read
        sch.compute_inline(block)
    sch.decompose_reduction(conv, ro)
    for loop in (*taps, cr, wr):
        sch.unroll(loop)
    if t.rc_in <= 8:
        sch.unroll(ri)
    return shared_bytes


def schedule_conv_gpu(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """The GPU direct-convolution schedule of ``func``, or None if it has no convolution block."""
    sch = Schedule(func)
    conv = find_conv_block(sch)
    if conv is None:
        return None
    kinds = [int(iv.iter_type) for iv in sch.get(conv).iter_vars]
    n_spatial = kinds.count(0)
    loops = sch.get_loops(conv)
    try:
        ext = [_ext(sch, lp) for lp in loops]
    except ValueError:
        return None
    n_outer = 1
    for e in ([ext[0], *ext[2:n_spatial - 2]] if n_spatial >= 4 else [ext[0]]):
        n_outer *= e
    h = ext[n_spatial - 2] if n_spatial >= 4 else 1
    tiling = pick_tiling(n_outer, ext[1], h, ext[n_spatial - 1], ext[n_spatial],
                         max_threads_per_block(target))
    limit = max_shared_bytes(target)
    candidates = [tiling]
    rc_in = tiling.rc_in
    while rc_in % 2 == 0 and rc_in > 1:
        rc_in //= 2
        candidates.append(ConvTiling(**{**tiling.__dict__, "rc_in": rc_in}))
    candidates.append(ConvTiling(**{**tiling.__dict__, "shared": False}))
    for cand in candidates:
        sch = Schedule(func)
        shared_bytes = _apply_conv(sch, cand)
        if shared_bytes is None:
            return None
        if shared_bytes <= limit:
            return sch.mod["main"].with_attr(SCHEDULED, "conv").with_attr(IS_SCHEDULED, True)
    return None


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
        ext = [_ext(sch, lp) for lp in loops]
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
    attrs = func.attrs or {}
    return (SCHEDULED in attrs or bool(attrs.get(IS_SCHEDULED, False))
            or bool(attrs.get(_IS_SCHEDULED_OLD, False)))


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
