"""What every default schedule rule reads: the mark a scheduled PrimFunc carries, loop extents,
iterator kinds, and the convolution block with the stages around it (CPU and GPU rules alike)."""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import Schedule

__all__ = ["IS_SCHEDULED", "SCHEDULED", "conv_stages", "extent", "find_conv_block", "has_root", "is_tuned",
           "iter_kinds", "largest_divisor", "marked_scheduled", "parallel", "spatial_only", "worth_threads"]

#: set on a PrimFunc by dcgraph's default rules (the value names the rule)
SCHEDULED = "dcgraph.schedule"
#: set by dlight and MetaSchedule (TVM 0.27 spells it tirx; older releases tir)
IS_SCHEDULED = "tirx.is_scheduled"
_IS_SCHEDULED_OLD = "tir.is_scheduled"


def marked_scheduled(func: tirx.PrimFunc) -> bool:
    """TVM's own mark: a tuning record or a dlight rule scheduled ``func``."""
    attrs = func.attrs or {}
    return bool(attrs.get(IS_SCHEDULED, attrs.get(_IS_SCHEDULED_OLD, False)))


def is_tuned(func: tirx.PrimFunc) -> bool:
    """Scheduled by a tuning record (TVM's mark without dcgraph's)."""
    return marked_scheduled(func) and SCHEDULED not in (func.attrs or {})


def extent(sch: Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def iter_kinds(sch: Schedule, block: s_tir.schedule.SBlockRV) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def find_conv_block(sch: Schedule) -> s_tir.schedule.SBlockRV | None:
    """The convolution block: >= 3 spatial iterators (N, C, *spatial), >= 2 reduction iterators
    (input channels, kernel taps), two inputs (data, weight)."""
    best = None
    for block in sch.get_child_blocks(sch.get_sblock("root")) if has_root(sch) else []:
        kinds = iter_kinds(sch, block)
        n_spatial = kinds.count(0)
        n_reduce = kinds.count(2)
        if n_reduce >= 2 and n_spatial >= 3 and len(kinds) == n_spatial + n_reduce:
            body = sch.get(block)
            if len(body.writes) == 1 and len(body.writes[0].region) == n_spatial and len(body.reads) >= 2:
                best = block
    return best


def has_root(sch: Schedule) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:  # TVM raises a generic error for a missing block
        return False
    return True


def conv_stages(sch: Schedule):
    """``(conv, producers, consumers)`` of the PrimFunc in ``sch`` (None if it has no conv block),
    with every stage after the conv but the last inlined into the last one (they are all
    elementwise on the conv output: Deep Control's epilogue, a fused residual add, relu)."""
    conv = find_conv_block(sch)
    if conv is None:
        return None
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    idx = names.index(sch.get(conv).name_hint)
    producers, consumers = blocks[:idx], blocks[idx + 1:]
    for block in consumers[:-1]:
        sch.compute_inline(block)
    return conv, producers, consumers[-1:]


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (1 at least)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def spatial_only(sch: Schedule, block) -> bool:
    """Whether every loop of ``block`` is spatial (no reduction)."""
    return all(k == 0 for k in iter_kinds(sch, block))


#: The storage scope of a register tile (an accumulator, a conv tile written back after its
#: epilogue). TVM's LowerTVMBuiltin puts a CPU allocation under 1 KiB on the stack only when its
#: scope is "global"; a "local" one becomes a TVMBackendAllocWorkspace call per parallel task, heap
#: memory LLVM cannot promote to registers, so every tile was zeroed, stored and reloaded there.
#: With "global" the tile is an alloca that LLVM keeps in registers: a block's 1x1 conv 0.84-0.89x
#: the time on x86 (AVX2, one thread), 0.91x the executed instructions on NEON.
TILE_SCOPE = "global"

#: A kernel under this many FLOPs and :data:`SERIAL_ELEMENTS` runs on one thread (:func:`parallel`).
#: With the thread pool's spinning off, each parallel region wakes the workers (~7 us here, more
#: for a kernel with several regions: the blocked shift's three took 25 us where one thread took
#: 2-5). Measured per kernel of pytorchcv MobileNetV2 (2-core Xeon AVX-512, hot caches), one
#: thread was faster below about 0.75 MFLOP / 100k elements (0.07-0.75x the parallel time).
SERIAL_FLOPS = 1 << 20
#: ... and under this many elements over all its buffers (a kernel that mostly moves data).
SERIAL_ELEMENTS = 1 << 17


def worth_threads(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` has enough work for the thread pool (:data:`SERIAL_FLOPS`,
    :data:`SERIAL_ELEMENTS`); a symbolic shape counts as enough."""
    elements = 0
    for param in func.params:
        shape = list(getattr(param, "shape", None) or [])
        if not all(isinstance(d, tirx.IntImm) for d in shape):
            return True
        elements += math.prod(int(d) for d in shape)
    if elements >= SERIAL_ELEMENTS:
        return True
    try:
        flops = float(s_tir.analysis.estimate_tir_flops(tvm.IRModule({"main": func})))
    except Exception:  # data movement only: TVM cannot count it
        flops = 0.0
    return flops >= SERIAL_FLOPS


def parallel(sch: Schedule, loop: s_tir.schedule.LoopRV, flops: float | None = None) -> None:
    """``sch.parallel(loop)`` unless the kernel is too small to gain from threads
    (:func:`worth_threads`); the loop then stays serial. ``flops``: the work of this loop nest
    alone, for a kernel with several (it is then parallel at :data:`SERIAL_FLOPS` or more)."""
    if worth_threads(sch.mod["main"]) if flops is None else flops >= SERIAL_FLOPS:
        sch.parallel(loop)
