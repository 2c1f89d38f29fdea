"""The GPU convolution rule: a register-tiled direct convolution with shared-memory staging and the
Deep Control epilogue on the register tile (see :mod:`.gpu` for the design and the numbers)."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import Schedule
from tvm.s_tir import dlight as dl

from .common import IS_SCHEDULED, SCHEDULED, conv_stages, find_conv_block

DEFAULT_SHARED_BYTES = 48 * 1024  # without the opt-in carve-out, on every CUDA GPU since Kepler
MIN_BLOCKS = 256  # about two waves on a 132-SM H100/H200: shrink register tiles below this

__all__ = ["ConvTiling", "max_shared_bytes", "max_threads_per_block", "pick_tiling", "schedule_conv_gpu",
           "static_extent"]


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


def static_extent(sch: Schedule, loop: s_tir.schedule.LoopRV) -> int:
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
        size *= static_extent(sch, loop)
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
        ext = [static_extent(sch, lp) for lp in loops]
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
