"""Default CPU schedule for the blocked Winograd conv (:mod:`..winograd`).

- ``pad``: ``(n, chunk, row)`` in parallel, the channel block vectorised.
- ``winograd_input``: per ``(n, chunk, tile)`` in parallel, ``B^T d`` (``winograd_input_rows``)
  into a local buffer, then ``(B^T d) B``; the transform elements unrolled (each is then a
  constant-coefficient sum of its non-zero terms), the channel block vectorised.
- ``winograd_gemm``: the direct kernel's register tile on a 1x1-conv-like GEMM: per transform
  element ``(e, u)`` and output-channel pair, :data:`..winograd.PIXEL_TILE` tiles x 2 channel
  blocks accumulate in registers over the input channels (pixels outside, channel blocks inside,
  so one broadcast of ``V`` feeds both weight vectors), written once per tile.
- the output transform, with the Deep Control epilogue and any fused consumers (a residual add,
  relu) inlined into one block: per ``(n, chunk, tile row)`` in parallel, per tile ``A^T M``
  (``winograd_output_rows``) into a local buffer, then its ``m x m`` outputs unrolled, the
  channel block vectorised.
"""

from __future__ import annotations

from tvm.s_tir import Schedule

from ..winograd import PIXEL_TILE
from .common import TILE_SCOPE, extent, has_root, parallel
from .cpu_blocked import tile_cap
from .knobs import DEFAULTS, Knobs


def _consumers(sch: Schedule) -> list | None:
    """The blocks from ``winograd_output`` on (it, then any fused consumers), or None if the
    PrimFunc is not a Winograd conv."""
    if not has_root(sch):
        return None
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    if "winograd_gemm" not in names or "winograd_output" not in names:
        return None
    return blocks[names.index("winograd_output"):]


def schedule_blocked_winograd(sch: Schedule, lanes: int = 16, knobs: Knobs = DEFAULTS) -> bool:
    """Schedule a :func:`..winograd.conv` PrimFunc (see the module docstring); False if it is not one.

    Knobs (:mod:`.knobs`) of the GEMM's register tile: ``oc_tile`` (channel blocks: 1, 2, 4) and
    ``pixel_tile`` (tiles: 2 to 8), under
    :func:`.cpu_blocked.tile_cap` accumulators."""
    consumers = _consumers(sch)
    if consumers is None:
        return False
    for block in consumers[:-1]:  # the output transform, a residual add ...: one block
        sch.compute_inline(block)
    out = consumers[-1]
    m = _tile_size(sch)

    # the output first: its batch loop stays serial and outermost, and every other stage is
    # computed under it, one sample at a time, so V and M are one sample big (at batch 8 the
    # whole batch's V and M, 15 MB each at 64 channels @56, ran 1.3x slower than per sample)
    n, k, y, z, j = sch.get_loops(out)
    yo, yi = sch.split(y, [None, m])
    zo, zi = sch.split(z, [None, m])
    sch.reorder(n, k, yo, zo, yi, zi, j)
    parallel(sch, sch.fuse(k, yo))
    sch.unroll(yi)
    sch.unroll(zi)
    sch.vectorize(j)
    _tile_stage(sch, "winograd_output_rows", zo)

    gemm = sch.get_sblock("winograd_gemm")
    sch.compute_at(gemm, n, preserve_unit_loops=True)  # (its own batch loop is left, extent 1)
    k, p, e, v, j, rk, rc = sch.get_loops(gemm)[-7:]
    kext, cap = extent(sch, k) or 1, tile_cap(lanes)
    oc_tile = knobs.pick("oc_tile", [t for t in (1, 2, 4) if kext % t == 0 and t <= cap],
                         2 if kext % 2 == 0 else 1)
    # the tiles a sample uses need not fill whole register tiles (the stored V and M are
    # rounded up to PIXEL_TILE; a last partial tile is guarded), so any size is a candidate
    pixel_tile = knobs.pick("pixel_tile", [t for t in (2, 3, 4, 6, 8) if t * oc_tile <= cap], PIXEL_TILE)
    ko, ki = sch.split(k, [None, oc_tile])
    po, pi = sch.split(p, [None, pixel_tile])
    sch.reorder(e, v, ko, po, rk, rc, pi, ki, j)
    acc = sch.cache_write(gemm, 0, TILE_SCOPE)
    sch.reverse_compute_at(acc, po, preserve_unit_loops=True)
    parallel(sch, sch.fuse(e, v, ko))
    sch.unroll(pi)
    sch.unroll(ki)
    sch.vectorize(j)
    init = sch.decompose_reduction(gemm, rk)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])

    inp = sch.get_sblock("winograd_input")
    sch.compute_at(inp, n, preserve_unit_loops=True)
    e, v, one, c, p, j = sch.get_loops(inp)[-6:]
    sch.reorder(one, c, p, e, v, j)
    tile_loop = sch.fuse(one, c, p)
    parallel(sch, tile_loop)
    sch.unroll(e)
    sch.unroll(v)
    sch.vectorize(j)
    _tile_stage(sch, "winograd_input_rows", tile_loop)

    pad = sch.get_sblock("pad")
    sch.compute_at(pad, n, preserve_unit_loops=True)
    one, c, y, z, j = sch.get_loops(pad)[-5:]
    parallel(sch, sch.fuse(one, c, y))
    sch.vectorize(j)
    return True


def _tile_stage(sch: Schedule, name: str, loop) -> None:
    """The first half of a separable transform (``B^T d`` or ``A^T M``): one tile's worth computed
    under ``loop`` into a local buffer, its two small loops unrolled, the channel block vectorised."""
    block = sch.get_sblock(name)
    sch.compute_at(block, loop, preserve_unit_loops=True)
    sch.set_scope(block, 0, TILE_SCOPE)
    *_, r, b, j = sch.get_loops(block)
    sch.unroll(r)
    sch.unroll(b)
    sch.vectorize(j)


def _tile_size(sch: Schedule) -> int:
    """``m`` of the kernel: the transform elements per axis (``m + 2``, the GEMM's ``e`` extent) - 2."""
    loops = sch.get_loops(sch.get_sblock("winograd_gemm"))
    return int(extent(sch, loops[3])) - 2
