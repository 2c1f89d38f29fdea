"""Dynamic batch by buckets: one library holding the model compiled for a few static batch sizes.

dcgraph's kernels are scheduled for static shapes (a symbolic batch ran ResNet-18 3.6x slower),
so a model that must take any batch size is compiled once per *bucket* (``1, 2, 4, ..., max``
by default) and the buckets are merged into one Relax module before optimisation: bucket ``b``'s
entry is ``main_b{b}`` (the example's batch keeps ``main``) and its kernels carry the suffix
``_b{b}``, so one build and one exported ``.so`` hold them all. At call time a batch of ``n``
runs as the bucket calls :func:`.runner.plan_batches` chooses (no padded sample where the buckets
allow, then as few calls as possible), its outputs concatenated along the batch.

That is exact only for a model whose samples do not interact (Deep Control's statistics are per
sample; BatchNorm in eval mode is too) and whose outputs all lead with the batch:
:func:`check_batch_major` reads the second from the merged module, :func:`check_independent`
runs the built buckets against each other for the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

from dcgraph.compare import relative_error

from .errors import CompileError

__all__ = ["bucket_sizes", "check_batch_major", "check_independent", "entry_name", "merge_buckets"]


def bucket_sizes(example_batch: int, max_batch: int | None = None,
                 buckets: Iterable[int] | None = None) -> tuple[int, ...]:
    """The batch sizes to compile: ``buckets`` as given, or the powers of two below ``max_batch``
    and ``max_batch`` itself; always with the example's batch. Empty: one static batch."""
    if buckets is None and max_batch is None:
        return ()
    if buckets is not None:
        sizes = {int(b) for b in buckets}
        if max_batch is not None and max(sizes, default=0) > max_batch:
            raise CompileError(f"a bucket ({max(sizes)}) is above max_batch={max_batch}")
    else:
        if int(max_batch) < 1:
            raise CompileError(f"max_batch must be a positive integer, got {max_batch}")
        sizes = {1 << i for i in range(int(max_batch).bit_length()) if 1 << i <= max_batch} | {int(max_batch)}
    if any(b < 1 for b in sizes):
        raise CompileError(f"batch buckets must be positive integers, got {sorted(sizes)}")
    return tuple(sorted(sizes | {example_batch}))


def entry_name(bucket: int, primary: int) -> str:
    """The Relax function (the VM's entry) that runs ``bucket``: ``main`` for the example's batch."""
    return "main" if bucket == primary else f"main_b{bucket}"


class _Rename(relax.PyExprMutator):
    """Every GlobalVar a Relax function refers to, replaced by its renamed twin."""

    def __init__(self, mod: tvm.IRModule, names: Mapping[tvm.ir.GlobalVar, tvm.ir.GlobalVar]) -> None:
        super().__init__(mod)
        self.names = names

    def visit_global_var_(self, op: tvm.ir.GlobalVar) -> relax.Expr:
        return self.names.get(op, op)


_Rename = relax.expr_functor.mutator(_Rename)


def merge_buckets(mods: Mapping[int, tvm.IRModule], primary: int) -> tvm.IRModule:
    """One module from per-bucket modules (each with its ``main``): bucket ``b``'s functions
    renamed ``{name}_b{b}`` and its ``main`` to :func:`entry_name`, the example's bucket as is."""
    merged: dict[tvm.ir.GlobalVar, tvm.ir.BaseFunc] = {}
    attrs = None
    for b, mod in sorted(mods.items()):
        names = {}
        for gv, _ in mod.functions_items():
            if gv.name_hint == "main":
                new = entry_name(b, primary)
            else:
                new = gv.name_hint if b == primary else f"{gv.name_hint}_b{b}"
            names[gv] = renamed = tvm.ir.GlobalVar(new)
            relax.expr._update_type(renamed, gv.ty)  # what a Relax call needs of its callee
        renamer = _Rename(mod, names)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                func = renamer.visit_expr(func)
            if func.attrs is not None and "global_symbol" in func.attrs:
                func = func.with_attr("global_symbol", names[gv].name_hint)
            merged[names[gv]] = func
        if b == primary:
            attrs = mod.attrs
    return tvm.IRModule(merged, attrs=attrs)


def _leaves(ty: Any) -> list[Any]:
    if isinstance(ty, relax.TupleType):
        return [leaf for field in ty.fields for leaf in _leaves(field)]
    return [ty] if isinstance(ty, relax.TensorType) else []


def check_batch_major(mods: Mapping[int, tvm.IRModule]) -> None:
    """Every output of every bucket's ``main`` leads with that bucket's batch (else a batch could
    not be split into bucket calls and put back together)."""
    for b, mod in mods.items():
        for i, leaf in enumerate(_leaves(mod["main"].ret_ty)):
            shape = [int(s) if isinstance(s, tvm.tirx.IntImm) else None for s in leaf.shape or []]
            if not shape or shape[0] != b:
                raise CompileError(f"output {i} has shape {tuple(shape)} at batch {b}: bucketed batches "
                                   "need every output to lead with the batch")


def check_independent(run: Callable[[int, Sequence[np.ndarray]], list[np.ndarray]],
                      inputs: Sequence[tuple[tuple[int, ...], str]], sizes: Sequence[int],
                      rtol: float = 1e-4) -> None:
    """Run each bucket on random inputs and the smallest bucket on its first and last samples: a
    model whose samples interact (a statistic over the batch) differs, and is refused.

    ``run(bucket, arrays)`` calls one bucket; ``inputs``: per input its shape past the batch and
    its dtype."""
    small, rng = min(sizes), np.random.default_rng(0)
    for b in sizes:
        if b == small:
            continue
        arrays = [rng.standard_normal((b, *shape)).astype(dtype) for shape, dtype in inputs]
        whole = run(b, arrays)
        for lo in (0, b - small):
            part = run(small, [a[lo:lo + small] for a in arrays])
            for w, p in zip(whole, part, strict=True):
                err = relative_error(p, w[lo:lo + small])
                if not err <= rtol:
                    raise CompileError(
                        f"samples {lo}..{lo + small - 1} of a batch of {b} differ from the same samples "
                        f"run alone (relative error {err:.1e}): the model mixes samples across the batch, "
                        "so it cannot take a dynamic batch by buckets")
