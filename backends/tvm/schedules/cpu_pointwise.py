"""Default CPU schedules for the NCHW pointwise kernels (:mod:`..kernels_pointwise`).

:func:`schedule_pointwise` is the GEMM over the map's pixels: the register tile is ``oc_tile``
output channels x ``reg_p`` pixel vectors (AVX2: 4 x 2 = 8 accumulators, AVX-512 / NEON: 4 x 4),
the input channels reduced around it, each FMA a broadcast weight scalar times a vector of
pixels; the Deep Control epilogue is applied to the tile before it is stored. The pixel tiles
are the outer (parallel) loop and the output channels run inside it, so a tile's input column
(``C_in`` x ``reg_p`` vectors) stays in L1 while every output channel reads it: the input is
read from memory once, however many channels the conv writes. Knobs: ``oc_tile``, ``reg_p``.

:func:`schedule_pointwise_shift` is its hoisted shift: the map sums (one parallel loop over
``(N, C_in)``, ``lanes`` partial sums), then the small ``(N, C_out)`` product.
"""

from __future__ import annotations

from tvm.s_tir import Schedule

from .common import TILE_SCOPE, extent, has_root, largest_divisor, parallel
from .cpu_blocked import divisors, max_accumulators, tile_cap
from .knobs import DEFAULTS, Knobs


def _blocks(sch: Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root"))) if has_root(sch) else []


def schedule_pointwise(sch: Schedule, lanes: int = 16, knobs: Knobs = DEFAULTS) -> bool:
    """The pointwise conv (see the module docstring); False if the PrimFunc is not one, or its
    map is not a whole number of vectors."""
    blocks = _blocks(sch)
    if len(blocks) < 2 or sch.get(blocks[0]).name_hint != "pointwise_conv":
        return False
    conv, out = blocks[0], blocks[-1]
    for block in blocks[1:-1]:  # elementwise stages after the epilogue (none from layout.py)
        sch.compute_inline(block)
    n, c, p, k = sch.get_loops(conv)
    size, channels = extent(sch, p), extent(sch, c)
    if size is None or channels is None or size % lanes:
        return False
    vectors, cap = size // lanes, tile_cap(lanes)
    oc_default = largest_divisor(channels, 4)
    oc_tile = knobs.pick("oc_tile", [t for t in (1, 2, 4, 8) if channels % t == 0 and t <= cap], oc_default)
    reg_p = knobs.pick("reg_p", divisors(vectors, 1, cap // oc_tile),
                       largest_divisor(vectors, max(1, max_accumulators(lanes) // oc_tile)))
    co, ci = sch.split(c, [None, oc_tile])
    po, pv, pl = sch.split(p, [None, reg_p, lanes])
    sch.reorder(n, po, co, k, ci, pv, pl)
    if len(sch.get_loops(out)) == 4:  # the epilogue over the flat pixel index, like the conv
        width = extent(sch, sch.get_loops(out)[3])
        sch.transform_block_layout(out, lambda i, c, y, z: (i, c, y * width + z))
    sch.reverse_compute_at(out, co, preserve_unit_loops=True)
    sch.set_scope(conv, 0, TILE_SCOPE)
    parallel(sch, sch.fuse(n, po))
    sch.unroll(ci)
    sch.unroll(pv)
    sch.vectorize(pl)
    init = sch.decompose_reduction(conv, k)
    sch.vectorize(sch.get_loops(init)[-1])
    tile = sch.get_loops(out)[-1]  # the tile's pixels
    _, vec = sch.split(tile, [None, lanes])
    sch.vectorize(vec)
    return True


def schedule_pointwise_shift(sch: Schedule, lanes: int = 16) -> bool:
    """The pointwise conv's hoisted shift (``map_sum``, ``map_mean``, ``shift``)."""
    blocks = _blocks(sch)
    if [sch.get(b).name_hint for b in blocks] != ["map_sum", "map_mean", "shift"]:
        return False
    total = blocks[0]
    n, k, rp = sch.get_loops(total)
    size = extent(sch, rp)
    parallel(sch, sch.fuse(n, k))
    if size is not None and size >= 2 * lanes and size % lanes == 0:
        _, part = sch.split(rp, [None, lanes])
        rf = sch.rfactor(part, 0)
        sch.vectorize(sch.get_loops(rf)[-1])
    loops = sch.get_loops(blocks[1])
    parallel(sch, loops[0])
    return True
