"""A MetaSchedule postprocessor that drops candidates TVM would decompose into wrong code.

MetaSchedule's ``RewriteReductionBlock`` splits every reduction block into an init block and an
update block at the block's *decompose point*: its outermost loop that is not purely
data-parallel for the blocks under it (``GetLoopIterType``). The init is written above that
loop, once. That is only sound when the loops from there inward run every point of the block
once. A producer reduction that ``compute_at`` placed under a consumer's reduction loop breaks
it: a hoisted-mean kernel's tap sums computed per 3-row window of a stride-2 consumer compute
row ``2k + 1`` in iterations ``k`` and ``k + 1``; before the rewrite each recomputation starts
from the block's ``T.init()`` and the result is right, after it the second accumulates onto the
first (relative errors 9e-2 and 5e-1 in the two candidates of ``tests/backends/test_tune.py``
that the device check caught, 2026-12-03).

:class:`RejectRecomputedReductions` runs just before ``RewriteReductionBlock`` and rejects such a
candidate: for each reduction block, the bindings of all its iterators (spatial and reduction)
must be a bijective affine map (``tvm.sym.detect_iter_map``, under the block's predicate) of
the loops from its decompose point inward, so that no point of the block runs twice there.
Bindings the analysis cannot read are rejected too: the search loses a candidate, the database
never gets a wrong one.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import s_tir, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.sym import detect_iter_map

__all__ = ["RejectRecomputedReductions", "recomputed_reductions", "with_sound_reductions"]

_DATA_PAR, _REDUCE = 0, 2  # tvm IterVar types (kDataPar, kCommReduce)


def _uses(expr: Any, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _children(stmt: Any) -> list[Any]:
    if isinstance(stmt, tirx.SeqStmt):
        return list(stmt.seq)
    if isinstance(stmt, tirx.IfThenElse):
        return [s for s in (stmt.then_case, stmt.else_case) if s is not None]
    body = getattr(stmt, "body", None)
    return [body] if body is not None else []


def _data_parallel(loop: tirx.For) -> bool:
    """TVM's ``GetLoopIterType(loop) == kDataPar``: every binding under ``loop`` (blocks not
    entered) that uses its variable binds a data-parallel iterator."""
    other = [False]

    def walk(stmt: Any) -> None:
        if isinstance(stmt, s_tir.SBlockRealize):
            for iv, value in zip(stmt.block.iter_vars, stmt.iter_values, strict=True):
                if int(iv.iter_type) != _DATA_PAR:
                    other[0] = other[0] or _uses(value, loop.loop_var)
            return
        for child in _children(stmt):
            walk(child)

    walk(loop.body)
    return not other[0]


def _sound(realize: Any, loops: list[tirx.For]) -> bool:
    """Whether decomposing ``realize``'s reduction at its decompose point keeps it exact."""
    point = next((i for i, lp in enumerate(loops) if not _data_parallel(lp)), None)
    if point is None:  # no reduction loop: the init lands right above the block
        return True
    inner = {lp.loop_var: tvm.ir.Range.from_min_extent(lp.min, lp.extent) for lp in loops[point:]}
    res = detect_iter_map(list(realize.iter_values), inner, realize.predicate, check_level="bijective")
    return len(res.indices) == len(realize.iter_values)


def recomputed_reductions(func: tirx.PrimFunc) -> list[str]:
    """Names of the reduction blocks of ``func`` (not yet decomposed) that TVM's decomposition
    would make wrong, or whose bindings the analysis cannot read."""
    bad: list[str] = []

    def walk(stmt: Any, loops: list[tirx.For]) -> None:
        if isinstance(stmt, tirx.For):
            walk(stmt.body, [*loops, stmt])
            return
        if isinstance(stmt, s_tir.SBlockRealize):
            block = stmt.block
            if block.init is not None and not _sound(stmt, loops):
                bad.append(str(block.name_hint))
            walk(block.body, [])  # a block's loops end at the enclosing block (GetLoops)
            return
        for child in _children(stmt):
            walk(child, loops)

    walk(func.body, [])
    return bad


@derived_object
class RejectRecomputedReductions(ms.postproc.PyPostproc):
    """Fails (drops the candidate) when :func:`recomputed_reductions` finds a block."""

    def _initialize_with_tune_context(self, context: Any) -> None:
        pass

    def apply(self, sch: s_tir.Schedule) -> bool:
        return not any(recomputed_reductions(f) for f in sch.mod.functions.values()
                       if isinstance(f, tirx.PrimFunc))

    def clone(self) -> ms.postproc.Postproc:
        return RejectRecomputedReductions()


def with_sound_reductions(mod: tvm.IRModule, target: tvm.target.Target) -> ms.space_generator.PostOrderApply:
    """The target's default design space, with :class:`RejectRecomputedReductions` inserted
    before ``RewriteReductionBlock`` (appended if the target has none)."""
    probe = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                           search_strategy="replay-trace", num_threads=1)
    space = probe.space_generator
    postprocs = list(space.postprocs)
    at = next((i for i, p in enumerate(postprocs) if isinstance(p, ms.postproc.RewriteReductionBlock)),
              len(postprocs))
    postprocs.insert(at, RejectRecomputedReductions())
    return ms.space_generator.PostOrderApply(sch_rules=list(space.sch_rules), postprocs=postprocs,
                                             mutator_probs=dict(space.mutator_probs))
