"""Default (untuned) schedules: what a build gets when no tuning record matches.

TVM's unscheduled CPU build of a convolution is a plain loop nest, tens of times slower
than PyTorch. :func:`schedule_conv_cpu` is a hand-written direct-convolution schedule for
any PrimFunc with a convolution block (dcgraph's ``conv`` + ``epilogue`` kernels, and TOPI's
``conv{1,2,3}d_nc*`` blocks after TVM's own fusion, so the unfused baseline gets the same
convolution schedule and a comparison measures fusion only):

- the output tile is ``ci`` output channels x ``wi`` consecutive output columns, held in
  registers (a "local" accumulator), ``wi`` vectorised, ``ci`` unrolled;
- the reduction runs over input channels, then kernel taps, around the tile;
- every elementwise stage after the convolution (Deep Control's scale/shift/activation,
  a fused residual add) is computed on the tile while it is in registers;
- the outer output loops are fused and run in parallel; zero padding is its own parallel
  stage (inlined, it would put a branch in the inner loop).

:func:`schedule_reduction_cpu` parallelises the small hoisted-shift kernels,
:func:`schedule_two_pass_cpu` the two-pass kernel. :data:`CPU_RULES` orders them; the
package (:mod:`dcgraph.backends.tvm.schedules`) applies them to a module; GPU targets use
:mod:`.gpu` (dlight rules plus a conv rule).
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from .common import SCHEDULED, TILE_SCOPE, conv_stages, extent, has_root, iter_kinds
from .cpu_blocked import (
    schedule_blocked_conv,
    schedule_blocked_depthwise,
    schedule_blocked_depthwise_dc,
    schedule_blocked_shift,
)
from .cpu_other_ops import (
    schedule_channel_reduction,
    schedule_from_blocked,
    schedule_injective,
    schedule_matmul,
)
from .cpu_pointwise import schedule_pointwise, schedule_pointwise_shift
from .cpu_winograd import schedule_blocked_winograd
from .knobs import Knobs


def _pick_tile(size: int | None, choices: tuple[int, ...]) -> int:
    if size is None:
        return 1
    for c in choices:
        if size % c == 0:
            return c
    return 1


def _width_tile(size: int | None, lanes: int) -> int:
    """Output columns per tile: one vector if it divides the row, else the largest divisor below.

    Measured on ResNet-18 shapes (AVX2): 8 channels x 8 columns (56-wide rows) or 8 x 7
    (28, 14, 7) ran 26-34 GMAC/s; 4 x 16 or 4 x 14, and any tile that does not divide the
    row (a predicated tail), ran 5-16.
    """
    if size is None:
        return 1
    if size % lanes == 0:
        return lanes
    for c in range(lanes - 1, 1, -1):
        if size % c == 0:
            return c
    return size if size < lanes else 1


def schedule_conv_cpu(sch: Schedule, lanes: int = 8) -> bool:
    """Schedule the PrimFunc in ``sch`` if it holds a convolution block; return whether it did."""
    stages = conv_stages(sch)
    if stages is None:
        return False
    conv, producers, consumers = stages
    # A conv with no epilogue writes its output through a register tile too.
    out = consumers[-1] if consumers else sch.cache_write(conv, 0, TILE_SCOPE)

    kinds = iter_kinds(sch, conv)
    n_spatial = kinds.count(0)
    loops = sch.get_loops(conv)
    spatial, reduce_ = loops[:n_spatial], loops[n_spatial:]
    c_ext = extent(sch, spatial[1])
    w_ext = extent(sch, spatial[-1])
    wi_n = _width_tile(w_ext, lanes)
    ci_n = _pick_tile(c_ext, (8, 4, 2))
    co, ci = sch.split(spatial[1], [None, ci_n])
    wo, wi = sch.split(spatial[-1], [None, wi_n])
    middle = list(spatial[2:-1])
    sch.reorder(spatial[0], co, *middle, wo, *reduce_, ci, wi)

    sch.reverse_compute_at(out, wo, preserve_unit_loops=True)
    if consumers:
        sch.set_scope(conv, 0, TILE_SCOPE)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.parallel(sch.fuse(spatial[0], co, *middle))
    sch.unroll(ci)
    sch.vectorize(wi)
    init = sch.decompose_reduction(conv, reduce_[0])  # zero the accumulator tile in registers
    sch.vectorize(sch.get_loops(init)[-1])

    for block in producers:  # padding (or any other per-input stage): parallel over (N, C)
        ploops = sch.get_loops(block)
        if len(ploops) >= 2:
            sch.parallel(sch.fuse(ploops[0], ploops[1]))
            if extent(sch, ploops[-1]):
                _, vec = sch.split(ploops[-1], [None, _pick_tile(extent(sch, ploops[-1]), (lanes, 4, 2))])
                sch.vectorize(vec)
    return True


def schedule_reduction_cpu(sch: Schedule, min_parallel: int = 16) -> bool:
    """Run the outer spatial loops of every block in parallel (the hoisted-shift kernels, pooling,
    means): blocks whose two outer loops (N, C) are spatial with at least ``min_parallel`` iterations."""
    if not has_root(sch):
        return False
    done = False
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        kinds = iter_kinds(sch, block)
        if len(loops) < 2 or len(kinds) < 2 or kinds[0] != 0 or kinds[1] != 0:
            continue
        extents = [extent(sch, loop) for loop in loops[:2]]
        if None in extents or extents[0] * extents[1] < min_parallel:
            continue
        sch.parallel(sch.fuse(loops[0], loops[1]))
        done = True
    return done


def schedule_mean_cpu(sch: Schedule, lanes: int = 8) -> None:
    """The hoisted shift's reductions (tap box sums, then ``m[n, c] = W[c, :] . T[n, :]``):
    each inner reduction vectorised as ``lanes`` partial sums (rfactor). Unvectorised, the
    small product cost more than the 14x14 convolutions it serves (0.8 ms of 4.8)."""
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    for name in names:
        if not (name == "hoisted_mean" or name.startswith("tap_sum")):
            continue
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)
        kinds = iter_kinds(sch, block)
        red_pos = [i for i, k in enumerate(kinds) if k == 2]
        red_loops = [loops[i] for i in red_pos]
        spatial = [loops[i] for i in range(len(loops)) if i not in red_pos]
        sch.reorder(*spatial, *red_loops)  # reductions innermost
        red = sch.fuse(*red_loops) if len(red_loops) > 1 else red_loops[0]
        ext = extent(sch, red)
        if ext is None or ext < 2 * lanes:
            continue
        _, inner = sch.split(red, [None, lanes])
        rf = sch.rfactor(inner, 0)
        sch.vectorize(sch.get_loops(rf)[-1])


def schedule_two_pass_cpu(sch: Schedule, lanes: int = 8) -> bool:
    """The two-pass Deep Control kernel (``map_sum`` then ``epilogue`` over the conv output):
    one parallel loop over (N, C); inside it the channel's map is summed (``lanes`` partial
    sums, rfactor) and then rewritten by the vectorised epilogue while it is still in cache.
    Left to the generic rule, both passes ran as scalar loops in two parallel regions."""
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if names != ["map_sum", "epilogue"]:
        return False
    epilogue = sch.get_sblock("epilogue")
    loops = sch.get_loops(epilogue)
    if len(loops) < 3 or None in [extent(sch, lp) for lp in loops]:
        return False
    outer = sch.fuse(loops[0], loops[1])
    inner = sch.fuse(*loops[2:]) if len(loops) > 3 else loops[2]
    size = extent(sch, inner)
    if size % lanes == 0:
        _, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)
    sch.parallel(outer)
    total = sch.get_sblock("map_sum")
    sch.compute_at(total, outer)
    red = sch.get_loops(total)[1:]  # the map's loops (none left when the map is one pixel)
    if red and size >= 2 * lanes and size % lanes == 0:
        red = sch.fuse(*red) if len(red) > 1 else red[0]
        _, part = sch.split(red, [None, lanes])
        rf = sch.rfactor(part, 0)
        sch.vectorize(sch.get_loops(rf)[-1])
    return True


def schedule_parallel_cpu(sch: Schedule, lanes: int = 8) -> bool:
    """Vectorise the hoisted shift's reductions, then run every block's (N, C) loops in parallel."""
    schedule_mean_cpu(sch, lanes)
    return schedule_reduction_cpu(sch)


#: The CPU rules in the order they are tried; the first that applies names the schedule
#: (``dcgraph.schedule`` = the rule's name). ``compile`` and ``tune`` both go through this list.
CPU_RULES: tuple[tuple[str, Callable[[Schedule, int], bool]], ...] = (
    ("blocked_winograd", schedule_blocked_winograd),
    ("blocked_conv", schedule_blocked_conv),
    ("blocked_depthwise_dc", schedule_blocked_depthwise_dc),
    ("blocked_depthwise", schedule_blocked_depthwise),
    ("blocked_shift", schedule_blocked_shift),
    ("pointwise", schedule_pointwise),
    ("pointwise_shift", schedule_pointwise_shift),
    ("conv", schedule_conv_cpu),
    ("two_pass", schedule_two_pass_cpu),
    ("channel_reduction", schedule_channel_reduction),
    ("matmul", schedule_matmul),
    ("from_blocked", schedule_from_blocked),
    ("injective", schedule_injective),
    ("parallel", schedule_parallel_cpu),
)


#: the rules with knobs (:mod:`.knobs`): they take a third argument, the tuner's picks
TUNABLE = frozenset({"blocked_winograd", "blocked_conv", "blocked_depthwise_dc", "blocked_depthwise",
                     "pointwise"})


def apply_cpu_rules(mod: tvm.IRModule | tirx.PrimFunc, lanes: int = 8, knobs: Knobs | None = None
                    ) -> tuple[str, Schedule] | None:
    """The first rule of :data:`CPU_RULES` that takes the PrimFunc: ``(its name, the schedule)``, or
    None. Each rule works on a fresh schedule, so a rule that gives up half-way (returns False,
    or a schedule primitive refuses) leaves nothing behind for the next one. ``knobs``: the
    picks a :data:`TUNABLE` rule makes (default: its defaults); a ``knobs`` with a ``sch``
    attribute gets each fresh schedule there, to record its picks in the trace."""
    for name, rule in CPU_RULES:
        sch = Schedule(mod)
        try:
            if knobs is not None and name in TUNABLE:
                if hasattr(knobs, "sch"):
                    knobs.sch = sch
                if rule(sch, lanes, knobs):
                    return name, sch
            elif rule(sch, lanes):
                return name, sch
        except tvm.s_tir.schedule.ScheduleError:
            continue
    return None


def schedule_func_cpu(func: tirx.PrimFunc, lanes: int = 8) -> tirx.PrimFunc | None:
    """The default CPU schedule for one PrimFunc, or None if no rule applies."""
    found = apply_cpu_rules(func, lanes)
    return None if found is None else found[1].mod["main"].with_attr(SCHEDULED, found[0])


_FEATURES: dict[str, frozenset[str]] = {}


def cpu_features(target: tvm.target.Target) -> frozenset[str]:
    """LLVM's CPU features for an ``llvm`` target (empty for other kinds): those of its ``mcpu`` on
    its ``mtriple``, with its ``mattr`` applied (``-mattr=-avx512f`` removes ``avx512f``).

    No ``mcpu`` means LLVM's generic CPU for the triple, not the host: TVM compiles
    ``Target("llvm")`` for generic x86-64 (SSE2; a 16-lane loop comes out as xmm code only), so
    its features are ``sse``/``sse2``. Use :func:`dcgraph.backends.tvm.targets.x86` for the host's CPU.
    """
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    if target.kind.name != "llvm":
        return frozenset()
    key = str(target)
    if key not in _FEATURES:
        _FEATURES[key] = frozenset(str(f) for f in tvm.target.codegen.llvm_get_cpu_features(target))
    return _FEATURES[key]


def vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of the target's widest vector unit, from its CPU features
    (:func:`cpu_features`): AVX-512 (``avx512f``) 16, AVX/AVX2 8, otherwise 4 (SSE, NEON, and
    any other 128-bit unit). Not an llvm target: 8 (the schedules' long-standing default)."""
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    if target.kind.name != "llvm":
        return 8
    features = cpu_features(target)
    if "avx512f" in features:
        return 16
    if "avx" in features or "avx2" in features:
        return 8
    return 4
