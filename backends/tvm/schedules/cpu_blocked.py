"""Default CPU schedules for the blocked-layout kernels (:mod:`..kernels_blocked`).

The dense conv (:func:`schedule_blocked_conv`) is a register-blocked micro-kernel: the
accumulator tile is ``reg_n`` output columns x ``oc_tile`` channel blocks, each block one
vector (the channel block is the SIMD width), held in registers; around it the reduction in
the order ``ic_chunk, kh, ic_block, kw (unrolled)``, so every FMA is a broadcast input scalar
times a packed weight vector and LLVM shares the broadcasts of neighbouring taps. The Deep
Control epilogue (scale, per-sample shift, activation, a fused residual add) is applied to the
tile before it is stored. ``(n, oc_chunk, oh)`` run in parallel.

Tile sizes (measured on a 2-core AVX-512 Xeon, ResNet-18's 3x3 shapes): ``reg_n x oc_tile``
of 7-16 vector accumulators ran best, ``oc_tile = 2`` blocks on most shapes; 28 accumulators
with ``kw`` unrolled spilled and ran 1.7-1.9x slower. With 16 vector registers (AVX2) the
tile is kept at about half that.

:func:`schedule_blocked_depthwise` vectorises the depthwise conv over the channel block,
:func:`schedule_blocked_two_pass` the two-pass kernel, :func:`schedule_blocked_shift` the
hoisted shift's box sums and its small product.
"""

from __future__ import annotations

from tvm.s_tir import Schedule

from ..kernels_blocked import channel_block
from .common import (
    TILE_SCOPE,
    conv_stages,
    extent,
    has_root,
    iter_kinds,
    largest_divisor,
    parallel,
    spatial_only,
)
from .knobs import DEFAULTS, Knobs


def max_accumulators(lanes: int) -> int:
    """Vector accumulators a tile may hold: 16 of AVX-512's 32 registers, 8 of AVX2's 16;
    NEON (4 lanes, 32 registers) 16."""
    return 8 if lanes == 8 else 16


def conv_tile(wo: int, oc_chunks: int, cb: int, lanes: int) -> tuple[int, int]:
    """``(reg_n, oc_tile)``: output columns and channel blocks per register tile."""
    vecs = max(1, cb // lanes) if cb >= lanes else 1
    budget = max_accumulators(lanes)
    oc_tile = 2 if oc_chunks % 2 == 0 and 2 * vecs * 4 <= budget else 1
    reg_n = largest_divisor(wo, budget // (oc_tile * vecs))
    if reg_n < 4 and oc_tile == 2:
        # a row without 4 columns to a tile (14 wide on AVX2: 2 x 2): all of the registers on
        # the row's columns (7 x 1), or on 4 channel blocks (2 x 4), whichever holds more
        columns = (largest_divisor(wo, budget // vecs), 1)
        channels = (largest_divisor(wo, budget // (4 * vecs)), 4) if oc_chunks % 4 == 0 else (0, 4)
        reg_n, oc_tile = max(columns, channels, key=lambda t: t[0] * t[1])
    return reg_n, oc_tile


#: a row of accumulators up to this many bytes may stay in memory across the input-channel chunks
#: (knob ``ic_outer``; the tile of one chunk still in registers)
ROW_TILE_BYTES = 4096


def ic_outer_default(oc_tile: int, vecs: int, row_bytes: int) -> int:
    """Whether the input-channel chunks go outside the row's column tiles by default: with 4
    vectors of channels to a tile and a row that fits :data:`ROW_TILE_BYTES`, each chunk's
    weights are then read from L1 by every column tile of the row, instead of streaming the
    whole filter through each tile (ResNet-18's 128->256 3x3/2 at 28 px on AVX2, 2 x 4 tiles:
    0.82-0.85x the time, batch 1 and 8)."""
    return int(oc_tile * vecs >= 4 and row_bytes <= ROW_TILE_BYTES)


def tile_cap(lanes: int) -> int:
    """Vector accumulators a *tuning candidate's* tile may hold: 1.5x :func:`max_accumulators`
    (12 of AVX2's 16 registers ran faster than 8 on some shapes, measured in session 14)."""
    return max_accumulators(lanes) * 3 // 2


def divisors(n: int, low: int, high: int) -> list[int]:
    """The divisors of ``n`` in ``[low, high]``, or ``[largest_divisor(n, high)]`` if none."""
    found = [d for d in range(max(1, low), min(n, high) + 1) if n % d == 0]
    return found or [largest_divisor(n, high)]


def _blocked_conv_stages(sch: Schedule):
    """``(conv, producers, consumers)`` if the PrimFunc is a blocked conv (5-d output), else None."""
    if not has_root(sch):
        return None
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    conv = next((b for b in blocks if sch.get(b).name_hint == "blocked_conv"), None)
    if conv is None:
        return None
    return conv_stages(sch)


def _schedule_pad(sch: Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    parallel(sch, sch.fuse(*loops[:3]))
    if (extent(sch, loops[-1]) or 0) >= 4:
        sch.vectorize(loops[-1])


def schedule_blocked_conv(sch: Schedule, lanes: int = 16, knobs: Knobs = DEFAULTS) -> bool:
    """The register-blocked dense conv (see the module docstring); False if not a blocked conv.

    Knobs (:mod:`.knobs`): ``oc_tile`` (channel blocks per tile: 1, 2, 4), ``reg_n`` (output columns
    per tile: divisors of the row), the tile under :func:`tile_cap` accumulators; ``unroll_kw`` (1:
    the kernel's columns unrolled, as by default); ``ic_outer`` (where a row of several tiles fits
    :data:`ROW_TILE_BYTES`: 1 runs the input-channel chunks outside the row's tiles, the row's
    accumulators in memory between chunks, see :func:`ic_outer_default`); on NEON (4 lanes)
    ``lane_inner`` (1, the default there for strided and 1x1 convs: the input channel block
    innermost in the reduction, so LLVM feeds by-element FMAs from lanes of one input load instead
    of a load per FMA: 0.52 -> 0.42 instructions per MAC on ResNet-18's strided 3x3; 0, the default
    for stride 1, where the columns' loads are shared between the kernel's taps: a direct 3x3
    stride-1 conv executed 1.2x the instructions with 1)."""
    stages = _blocked_conv_stages(sch)
    if stages is None:
        return False
    conv, producers, consumers = stages
    reductions = iter_kinds(sch, conv).count(2)
    if reductions not in (3, 4):  # (chunk, kh, kw, lane), or (kh, kw, real channel): padded input
        return False
    out = consumers[-1] if consumers else sch.cache_write(conv, 0, TILE_SCOPE)
    neon = lanes == 4
    lane_inner = knobs.pick("lane_inner", [1, 0] if neon else [0], int(neon and _no_tap_reuse(sch, conv)))
    if reductions == 4:
        n, ko, oh, ow, co, rk, rh, rw, rc = sch.get_loops(conv)
        order = [rk, rh, rw, rc] if lane_inner else [rk, rh, rc, rw]
    else:
        n, ko, oh, ow, co, rh, rw, rc = sch.get_loops(conv)
        rk = rh
        order = [rh, rw, rc] if lane_inner else [rh, rc, rw]
    wo, kos, cb = extent(sch, ow), extent(sch, ko), extent(sch, co)
    reg_n, oc_tile = conv_tile(wo, kos, cb, lanes)
    vecs, cap = max(1, cb // lanes), tile_cap(lanes)
    oc_choice = knobs.pick("oc_tile", [t for t in (1, 2, 4) if kos % t == 0 and t * vecs <= cap], oc_tile)
    if oc_choice != oc_tile:
        oc_tile, reg_n = oc_choice, largest_divisor(wo, max_accumulators(lanes) // (oc_choice * vecs))
    reg_n = knobs.pick("reg_n", divisors(wo, 2, cap // (oc_tile * vecs)), reg_n)
    unroll_kw = knobs.pick("unroll_kw", [1, 0] if (extent(sch, rw) or 1) > 1 else [1], 1)
    row_bytes = wo * oc_tile * cb * 4
    movable = reductions == 4 and wo > reg_n and row_bytes <= ROW_TILE_BYTES  # else the same loop nest
    ic_outer = knobs.pick("ic_outer", [0, 1] if movable else [0],
                          ic_outer_default(oc_tile, vecs, row_bytes) if movable else 0)
    koo, koi = sch.split(ko, [None, oc_tile])
    owo, owi = sch.split(ow, [None, reg_n])
    if ic_outer:
        sch.reorder(n, koo, oh, order[0], owo, *order[1:], koi, owi, co)
        sch.reverse_compute_at(out, oh, preserve_unit_loops=True)
    else:
        sch.reorder(n, koo, oh, owo, *order, koi, owi, co)
        sch.reverse_compute_at(out, owo, preserve_unit_loops=True)
    if consumers:
        sch.set_scope(conv, 0, TILE_SCOPE)
    par = sch.fuse(n, koo, oh)
    parallel(sch, par)
    if unroll_kw:
        sch.unroll(rw)
    if lane_inner:
        sch.unroll(rc)
    sch.unroll(koi)
    sch.unroll(owi)
    sch.vectorize(co)
    init = sch.decompose_reduction(conv, rk)
    sch.vectorize(sch.get_loops(init)[-1])
    oloops = sch.get_loops(out)
    sch.vectorize(oloops[-1])
    for block in producers:  # per row (see _pad_per_row) measured 5-10% slower for dense convs here
        _schedule_pad(sch, block, lanes)
    return True


def _no_tap_reuse(sch: Schedule, conv) -> bool:
    """Whether neighbouring output columns of the blocked conv share no input column between the
    kernel's taps: a 1-wide kernel, or a stride above 1 (the (padded) input row spans more than
    the ``out_w + k_w - 1`` columns a stride-1 conv reads)."""
    reads = sch.get(conv).reads
    data = next((r.source for r in reads if len(r.source.shape) == 5), None)
    weight = next((r.source for r in reads if len(r.source.shape) == 6), None)
    out = sch.get(conv).writes[0].source
    if data is None or weight is None or len(out.shape) != 5:
        return False
    in_w, out_w, kw = int(data.shape[3]), int(out.shape[3]), int(weight.shape[3])
    return kw == 1 or (out_w > 1 and in_w > out_w + kw - 1)


def _pad_per_row(sch: Schedule, producers, par, lanes: int) -> None:
    """Zero padding computed per output row inside the parallel loop (the ``kh`` input rows the
    row reads, while they are in cache), not as a pass of its own over the whole input: the
    depthwise convs of MobileNetV2-like went from 4.7 to 2.7 ms (per model call, batch 1)."""
    for block in producers:
        sch.compute_at(block, par, preserve_unit_loops=True)
        loops = sch.get_loops(block)
        if (extent(sch, loops[-1]) or 0) >= 4:
            sch.vectorize(loops[-1])


def _depthwise_reg_n(sch: Schedule, ow, lanes: int, knobs: Knobs) -> int:
    """Columns per depthwise tile: the largest divisor of the row up to 8; knob ``reg_n``."""
    wo = extent(sch, ow) or 1
    return knobs.pick("reg_n", divisors(wo, 2, tile_cap(lanes)), largest_divisor(wo, 8))


def schedule_blocked_depthwise(sch: Schedule, lanes: int = 16, knobs: Knobs = DEFAULTS) -> bool:
    """Depthwise blocked conv: ``(n, c_chunk, oh)`` parallel, ``reg_n`` columns unrolled, the
    channel block vectorised, the taps around them; epilogue (if any) on the tile. Knob:
    ``reg_n``."""
    stages = _blocked_conv_stages(sch)
    if stages is None:
        return False
    conv, producers, consumers = stages
    if iter_kinds(sch, conv).count(2) != 2:
        return False
    out = consumers[-1] if consumers else sch.cache_write(conv, 0, TILE_SCOPE)
    n, k, oh, ow, c, rh, rw = sch.get_loops(conv)
    reg_n = _depthwise_reg_n(sch, ow, lanes, knobs)
    owo, owi = sch.split(ow, [None, reg_n])
    sch.reorder(n, k, oh, owo, rh, rw, owi, c)
    sch.reverse_compute_at(out, owo, preserve_unit_loops=True)
    if consumers:
        sch.set_scope(conv, 0, TILE_SCOPE)
    par = sch.fuse(n, k, oh)
    parallel(sch, par)
    sch.unroll(rh)
    sch.unroll(rw)
    sch.unroll(owi)
    sch.vectorize(c)
    init = sch.decompose_reduction(conv, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out)[-1])
    _pad_per_row(sch, producers, par, lanes)
    return True


#: a depthwise map of at least this many output pixels has its sum added up tile by tile as the
#: conv writes it (:func:`schedule_blocked_depthwise_dc`); smaller ones sum the finished map.
#: Measured hot, alone (2-core Zen 5, MobileNetV2's shapes): 112 px 66 -> 62 us, 112 px stride 2
#: 76 -> 61, 56 px 78 -> 72, 28 px 45 -> 41, 14 px even, 7 px 22 -> 37 (slower).
FUSED_SUM_PIXELS = 14 * 14


def schedule_blocked_depthwise_dc(sch: Schedule, lanes: int = 16, knobs: Knobs = DEFAULTS) -> bool:
    """Depthwise conv + two-pass Deep Control in one kernel
    (:func:`..kernels_blocked.depthwise_deep_control`): ``(n, c_chunk)`` parallel; in each
    iteration, per output row, the padded input rows it reads; the channel block's conv
    map (the :func:`schedule_blocked_depthwise` tile: ``reg_n`` columns x the vector channel block
    in registers, the taps around them) written to a scratch map that stays in cache, the map
    sum (vectorised over the block; on maps of :data:`FUSED_SUM_PIXELS` or more added up from
    each tile as it is written, not from a second read of the scratch map) and the epilogue
    (with any elementwise op fused after it) over that map. The output is written once; the
    input is read once. Knobs: ``reg_n``; on NEON ``pad_map`` (1, the default there: the channel
    block's padded map built once per iteration; 0: the ``kh`` padded rows each output row reads,
    rebuilt per row, the x86 default: on emulated aarch64 the per-row padding executed 1.3-1.8x
    the instructions of the whole kernel with the map built once)."""
    names = _names(sch)
    if "blocked_conv" not in names or "map_sum" not in names:
        return False
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    conv, msum = blocks[names.index("blocked_conv")], blocks[names.index("map_sum")]
    if iter_kinds(sch, conv).count(2) != 2 or names.index("map_sum") < names.index("blocked_conv"):
        return False
    producers = blocks[:names.index("blocked_conv")]
    after = blocks[names.index("map_sum") + 1:]
    if not after or not all(spatial_only(sch, b) for b in [*producers, *after]):
        return False
    for block in after[:-1]:
        sch.compute_inline(block)
    out = after[-1]
    loops = sch.get_loops(out)
    if len(loops) != 5:
        return False
    n, k, _, _, j = loops
    par = sch.fuse(n, k)
    parallel(sch, par)
    sch.vectorize(j)
    sch.compute_at(msum, par, preserve_unit_loops=True)
    sch.compute_at(conv, par, preserve_unit_loops=True)
    # the conv tile
    oh, ow, c, rh, rw = sch.get_loops(conv)[-5:]
    fused_sum = (extent(sch, oh) or 0) * (extent(sch, ow) or 0) >= FUSED_SUM_PIXELS
    reg_n = _depthwise_reg_n(sch, ow, lanes, knobs)
    owo, owi = sch.split(ow, [None, reg_n])
    sch.reorder(oh, owo, rh, rw, owi, c)
    tile = sch.cache_write(conv, 0, TILE_SCOPE)
    sch.reverse_compute_at(tile, owo, preserve_unit_loops=True)
    if fused_sum:  # the map sum added up from each tile as it is written
        sch.reverse_compute_at(msum, owo, preserve_unit_loops=True)
    # the map sum: (j | s0, s1) -> (s0, s1 | j), j vectorised
    sj, s0, s1 = sch.get_loops(msum)[-3:]
    sch.reorder(s0, s1, sj)
    sch.vectorize(sj)
    if not fused_sum:
        sinit = sch.decompose_reduction(msum, s0)
        sch.vectorize(sch.get_loops(sinit)[-1])
    # the padded input: per output row (the kh rows it reads) or the block's whole map at once
    pad_map = knobs.pick("pad_map", [1, 0] if lanes == 4 else [0], 1 if lanes == 4 else 0)
    _pad_per_row(sch, producers, par if pad_map else oh, lanes)
    sch.unroll(rh)
    sch.unroll(rw)
    sch.unroll(owi)
    sch.vectorize(c)
    init = sch.decompose_reduction(conv, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(tile)[-1])
    return True


def _names(sch: Schedule) -> list[str]:
    if not has_root(sch):
        return []
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _vector_split(sch: Schedule, loop, lanes: int):
    """Split ``loop`` into ``(outer, a vector of lanes)``; None if its extent does not divide."""
    ext = extent(sch, loop)
    if ext is None or ext % lanes:
        return None
    return sch.split(loop, [None, lanes])


#: vector accumulators of the hoisted shift's tiles (the row sums' and the mean product's)
SHIFT_VECTORS = 4


def schedule_blocked_shift(sch: Schedule, lanes: int = 16) -> bool:
    """The blocked hoisted shift in one parallel region where it can: per ``(n, input channel
    block)`` the row sums ``tap_sum0`` (a tile of up to :data:`SHIFT_VECTORS` vectors over the
    contiguous ``(W, cbi)`` of the input rows, accumulated over the output rows in registers),
    then its column sums ``tap_sum1`` (the channel block vectorised); the small product
    ``m = W . T`` vectorised over output channels, a few channel blocks per tile so their FMA
    chains interleave, on one thread unless it has :data:`.common.SERIAL_FLOPS` of its own.

    Each parallel region wakes the thread pool (17-21 us on the 2-core Zen 5 VM with spinning
    off, against a few us of work in most shifts): the earlier schedule had three. Summing rows
    first keeps a first layer's input (3 channels, a channel block of 1) vectorised along its
    rows: ResNet-18's 7x7 stem shift 139 -> 27 us (hot, alone), its 3x3 shifts 35-71 -> 17-20.

    Running the whole shift on one thread was faster still alone (9-21 us) but not in the
    model: the next kernel's wake-up then cost that much more (the worker had slept longer; a
    VM's halted vCPU wakes slowly), so the shift follows the kernel-wide rule."""
    names = _names(sch)
    if names[:2] != ["tap_sum0", "tap_sum1"] or "blocked_mean" not in names:
        return False
    rows, cols = sch.get_sblock("tap_sum0"), sch.get_sblock("tap_sum1")
    if len(sch.get_loops(rows)) != 6 or len(sch.get_loops(cols)) != 6:
        return False  # (n, k, a, b, c) + the reduction: only the 5-d blocked sums
    n, k, r, t, c, o = sch.get_loops(cols)
    sch.reorder(n, k, r, t, o, c)
    if (extent(sch, c) or 0) >= 4:
        sch.vectorize(c)
    nk = sch.fuse(n, k)
    parallel(sch, nk)
    sch.compute_at(rows, nk, preserve_unit_loops=True)
    rr, w, cc, ro = sch.get_loops(rows)[-4:]
    wc = sch.fuse(w, cc)
    size = extent(sch, wc) or 1
    tile = next((v for v in range(SHIFT_VECTORS * lanes, 0, -lanes) if size % v == 0), 0) \
        or largest_divisor(size, SHIFT_VECTORS * lanes)
    wo, wi = sch.split(wc, [None, tile])
    sch.reorder(rr, wo, ro, wi)
    sch.vectorize(wi)
    init = sch.decompose_reduction(rows, ro)
    sch.vectorize(sch.get_loops(init)[-1])

    block = sch.get_sblock("blocked_mean")
    n, c, rc, r0, r1 = sch.get_loops(block)
    vec = _vector_split(sch, c, channel_block(extent(sch, c) or 1, lanes))
    if vec is not None:
        co, ci = vec
        group = largest_divisor(extent(sch, co) or 1, SHIFT_VECTORS)
        coo, coi = sch.split(co, [None, group])
        sch.reorder(n, coo, rc, r0, r1, coi, ci)
        acc = sch.cache_write(block, 0, TILE_SCOPE)
        sch.reverse_compute_at(acc, coo, preserve_unit_loops=True)
        sch.vectorize(ci)
        sch.unroll(coi)
        sch.vectorize(sch.get_loops(acc)[-1])
        body = sch.get(block)
        flops = 2.0
        for iv in body.iter_vars:
            flops *= int(iv.dom.extent)
        parallel(sch, sch.fuse(n, coo), flops)
        init = sch.decompose_reduction(block, rc)
        sch.vectorize(sch.get_loops(init)[-1])
    shift = sch.get_sblock("shift")
    sloops = sch.get_loops(shift)
    vec = _vector_split(sch, sloops[-1], lanes)
    if vec is not None:
        sch.vectorize(vec[1])
    return True
