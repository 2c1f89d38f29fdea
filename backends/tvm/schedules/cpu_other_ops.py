"""Default CPU schedules for the kernels between the convs: leaving the blocked layout, elementwise
kernels and layout changes, channel reductions (pooling, the global mean, the two-pass map sum)
and the matmul (the classifier, one-pixel convs)."""

from __future__ import annotations

from tvm.s_tir import Schedule

from ..packed_matmul import tile_rows
from .common import TILE_SCOPE, extent, has_root, iter_kinds, largest_divisor, parallel, spatial_only


def schedule_from_blocked(sch: Schedule, lanes: int = 16) -> bool:
    """``from_blocked`` (``(N, C/cb, H, W, cb) -> (N, C, H, W)``, where a model leaves the blocked
    layout) as a tiled transpose: the channel loop split into ``(C/cb, cb)`` and the loops ordered
    ``n, C/cb, h | cb, w``, so one parallel iteration reads one ``W x cb`` row block of the input
    (in L1) and writes ``cb`` contiguous output rows, ``w`` vectorised. The plain injective order
    (``n, c, h, w``) read every input cache line ``cb`` times, from L2: 0.31 ms where the conv
    before it took 0.30 (MobileNetV2's 144-channel expand at 56 px)."""
    if not has_root(sch):
        return False
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    if len(blocks) != 1 or sch.get(blocks[0]).name_hint != "from_blocked":
        return False
    block = blocks[0]
    func = sch.mod["main"]
    loops = sch.get_loops(block)
    if len(func.params) != 2 or len(loops) != 4:
        return False
    shape = func.params[0].shape
    if len(shape) != 5:
        return False
    cb = int(shape[-1])
    n, c, h, w = loops
    if cb == 1:
        return False
    k, ci = sch.split(c, [None, cb])
    sch.reorder(n, k, h, ci, w)
    parallel(sch, sch.fuse(n, k, h))
    ext = extent(sch, w)
    if ext is not None and ext > 4 * lanes:
        _, w = sch.split(w, [None, lanes])
        ext = lanes
    if ext is not None and ext >= 4:
        sch.vectorize(w)
    return True


def schedule_injective(sch: Schedule, lanes: int = 16) -> bool:
    """Every block elementwise or a layout change (``to_blocked``, a residual add, relu, a
    Squeeze-Excitation scale): all but the last inlined, its outer loops fused and parallel,
    its innermost loop vectorised when it is a channel block or a multiple of the lanes."""
    if not has_root(sch):
        return False
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    if not blocks or not all(spatial_only(sch, b) for b in blocks):
        return False
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except Exception:  # a block TVM cannot inline: leave the kernel to another rule
            return False
    last = blocks[-1]
    loops = sch.get_loops(last)
    if not loops:
        return False
    inner = loops[-1]
    ext = extent(sch, inner)
    outer = loops[:-1]
    if ext is not None and ext > 4 * lanes and ext % lanes == 0:
        o, inner = sch.split(inner, [None, lanes])
        outer = [*outer, o]
        ext = lanes
    if outer:
        parallel(sch, sch.fuse(*outer) if len(outer) > 1 else outer[0])
    if ext is not None and 4 <= ext <= 4 * lanes:
        sch.vectorize(inner)
    return True


def schedule_channel_reduction(sch: Schedule, lanes: int = 16) -> bool:
    """A reduction whose innermost spatial loop is the channel block (blocked pooling, the
    blocked global mean, the two-pass map sum): the reduction loops moved outside that loop,
    which is vectorised; the outer spatial loops parallel; producers (padding) inlined; the
    elementwise consumer (the two-pass epilogue over the whole map, a fused residual add) computed
    in the same parallel iteration, so a channel block's map is summed and rewritten while it is
    in cache (left as a loop of its own, the epilogue ran serial and scalar: 2.3 ms of
    MobileNetV2's 13)."""
    if not has_root(sch):
        return False
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    red = [b for b in blocks if 2 in iter_kinds(sch, b)]
    if len(red) != 1:
        return False
    block = red[0]
    kinds = iter_kinds(sch, block)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or kinds[-1] != 2:
        return False
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == 0]
    reduce_ = [lp for lp, k in zip(loops, kinds, strict=True) if k == 2]
    if len(spatial) < 3 or (extent(sch, spatial[-1]) or 0) not in (4, 8, 16, 32, 64):
        return False
    idx = blocks.index(block)
    for b in blocks[:idx]:
        if spatial_only(sch, b):
            sch.compute_inline(b)
    for b in blocks[idx + 1:-1]:
        sch.compute_inline(b)
    consumers = blocks[idx + 1:][-1:]
    sch.reorder(*spatial[:-1], *reduce_, spatial[-1])
    outer = spatial[:-1]
    sch.vectorize(spatial[-1])
    par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    parallel(sch, par)
    for consumer in consumers:
        sch.reverse_compute_at(consumer, par, preserve_unit_loops=True)
        cloops = sch.get_loops(consumer)
        if (extent(sch, cloops[-1]) or 0) in (4, 8, 16, 32, 64):
            sch.vectorize(cloops[-1])
    return True


def _is_matmul(sch: Schedule, block) -> bool:
    kinds = iter_kinds(sch, block)
    if kinds == [0, 0, 2]:
        return True
    loops = sch.get_loops(block)
    return (len(kinds) == len(loops) and kinds[:2] == [0, 0] and kinds[-1] == 2
            and all(k == 0 and extent(sch, lp) == 1 for k, lp in zip(kinds[2:-1], loops[2:-1], strict=True)))


def _panel_width(sch: Schedule, block) -> int | None:
    """``B`` of a packed weight (a 3-d ``N/B x K x B`` read, :mod:`..packed_matmul`), else None."""
    for region in sch.get(block).reads:
        if len(region.source.shape) == 3:
            return int(region.source.shape[2])
    return None


def schedule_matmul(sch: Schedule, lanes: int = 16) -> bool:
    """A dense / matmul block ``(i, j, k)`` (the classifier; a one-pixel conv's ``(i, j, 1, 1, k)``,
    :mod:`..pixel_matmul`): a register tile of ``rows x width`` outputs accumulated over ``k``,
    ``(i_outer, j_outer)`` parallel, a bias add and an activation applied to the tile.

    With a packed weight (:mod:`..packed_matmul`) ``width`` is its panel ``B`` and the tile takes
    as many rows as fit its accumulator budget (:func:`..packed_matmul.tile_rows`; each step: a
    broadcast ``x[i, k]`` per row times the panel's row ``k``); otherwise one row of ``lanes``
    columns. Padded panels: the tile's columns past ``N`` are computed and not written (the
    write-out loop is not vectorised then: a predicate guards its last tile)."""
    if not has_root(sch):
        return False
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    mm = [b for b in blocks if _is_matmul(sch, b)]
    if len(mm) != 1 or blocks.index(mm[0]) != 0:
        return False
    block = mm[0]
    if any(not spatial_only(sch, b) for b in blocks[1:]):
        return False
    for b in blocks[1:-1]:
        sch.compute_inline(b)
    i, j, *units, k = sch.get_loops(block)
    panel = _panel_width(sch, block)
    width = panel or largest_divisor(extent(sch, j) or 1, lanes)
    if width < 2 or (extent(sch, j) or 0) % width:
        return False
    rows = tile_rows(extent(sch, i) or 1, width, lanes) if panel is not None else 1
    out_block = sch.get(blocks[-1])
    padded = len(out_block.iter_vars) > 1 and int(out_block.iter_vars[1].dom.extent) != extent(sch, j)
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, width])
    sch.reorder(io, jo, *units, k, ii, ji)
    out = blocks[-1] if len(blocks) > 1 else sch.cache_write(block, 0, TILE_SCOPE)
    sch.reverse_compute_at(out, jo, preserve_unit_loops=True)
    if len(blocks) > 1:
        sch.set_scope(block, 0, TILE_SCOPE)
    sch.vectorize(ji)
    if rows > 1:
        sch.unroll(ii)
    tail = sch.get_loops(out)[2:]  # (io, jo | the tile's loops, in the output's axis order)
    wide = [lp for lp in tail if extent(sch, lp) != 1]
    if len(wide) == 2:  # (rows, columns): columns innermost, rows unrolled around them
        sch.reorder(*[lp for lp in tail if lp not in wide], *wide)
        sch.unroll(wide[0])
    elif len(wide) == 1 and wide[0] != tail[-1]:
        sch.reorder(*[lp for lp in tail if lp != wide[0]], wide[0])
    if not padded:
        sch.vectorize(sch.get_loops(out)[-1])
    parallel(sch, sch.fuse(io, jo))  # one thread for a small one (an SE gate): common.SERIAL_FLOPS
    init = sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(init)[-1])
    if rows > 1:
        sch.unroll(sch.get_loops(init)[-2])
    return True
