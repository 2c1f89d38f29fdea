"""``compile``: a PyTorch model, exported program, ONNX model or Relax module -> a compiled model.

The path: norms converted to Deep Control and fused (dcgraph's torch or ONNX passes) ->
imported into Relax (fused ops become dcgraph's kernels; Deep Control left as plain ops is
fused by :mod:`.fuse_plain`): :func:`.frontends.prepare` -> TVM's fusion -> tuned records
where a database has them (:mod:`.database`), dcgraph's default schedules elsewhere
(:mod:`.schedules`) -> a Relax VM executable for the target, wrapped in a
:class:`.runtime.CompiledModel`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm

from . import targets as targets_
from .buckets import bucket_sizes, check_batch_major, check_independent, entry_name, merge_buckets
from .database import applied_database
from .errors import CompileError
from .frontends import as_tuple, prepare
from .pipeline import kernel_report, lower_pipeline, optimize, uses_blocked
from .runtime import CompiledModel, InputSpec, _flatten
from .shipped import shipped_records
from .shipped import source as shipped_source

__all__ = ["compile", "inputs_of"]


def inputs_of(mod: tvm.IRModule) -> list[InputSpec]:
    """The input signature of ``mod["main"]`` (-1 for a symbolic dim)."""
    func = mod["main"]
    n = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    specs = []
    for p in list(func.params)[:n]:
        ty = p.ty
        shape = tuple(int(s) if isinstance(s, tvm.tirx.IntImm | int) else -1 for s in ty.shape)
        specs.append(InputSpec(str(p.name), shape, str(ty.dtype)))
    return specs


def compile(
    model: Any, target: str | dict | tvm.target.Target | None = "x86",
    example_inputs: Any = None, *, plan: str = "auto", convert: bool = True,
    fuse_plain: bool = True, database: Any = None, shape: dict | None = None, layout: str = "auto",
    max_batch: int | None = None, buckets: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None, winograd: bool = True, shipped: bool = True,
) -> CompiledModel:
    """Compile ``model`` for ``target`` (preset name, dict, tag or Target).

    ``example_inputs``: a tensor or tuple for a torch model (shapes are compiled in).
    ``convert``: run dcgraph's norm-to-Deep-Control passes first. ``fuse_plain``: fuse Deep
    Control written as plain ops in Relax. ``plan``: the fused kernels' form
    (:class:`.lowering.LoweringOptions`). ``database``: a MetaSchedule database, or a directory:
    one written by ``dcgraph tune`` (the sub-database for ``target`` is used) or a single
    JSON database; its records win over the default schedules. ``layout``: ``auto`` (the blocked
    ``NCHW[x]c`` layout on CPU targets, :mod:`.layout`), ``blocked`` or ``nchw`` (the plain kernels).
    ``max_batch`` / ``buckets``: a dynamic batch; the model is compiled for each bucket (by
    default the powers of two up to ``max_batch``, and ``max_batch``) into one library and then
    takes any batch size (:mod:`.buckets`); the example's batch is always a bucket.
    ``progress``: called with a line as each stage starts (``dcgraph compile`` prints them).
    ``winograd``: in the blocked layout, 3x3 stride-1 convs with constant weights run as Winograd
    F(m, 3) (:mod:`.winograd`: 1.3-2.6x faster per conv, float32 error ~1e-6 of the output's range,
    a transformed weight 1.8-4x the size); False keeps every conv direct. ``shipped``: without a
    ``database``, apply the tuning records dcgraph ships for the target's CPU family where they
    match a kernel (:mod:`.shipped`); ``summary()`` says where the records came from.
    """
    say = progress or (lambda _msg: None)
    tgt = targets_.resolve(target)
    uses_blocked(tgt, layout)  # an unknown layout fails here, before the import
    example = as_tuple(example_inputs)
    sizes = bucket_sizes(_batch_of(example, max_batch, buckets), max_batch, buckets)
    records = None
    if isinstance(database, str | Path):
        records = str(database)
        database = applied_database(database, tgt)
    elif database is None and shipped and shipped_records(tgt) is not None:
        found = shipped_records(tgt)
        records, database = shipped_source(found), applied_database(found, tgt)
    elif database is not None:
        records = "the given database"
    if not sizes:
        say("importing the model (dcgraph's passes, then Relax)")
        mod = prepare(model, example_inputs, plan=plan, convert=convert, fuse_plain=fuse_plain, shape=shape)
        inputs, entries = inputs_of(mod), {}
    else:
        primary = int(example[0].shape[0])
        mods = {}
        for i, b in enumerate(sizes):
            say(f"importing the model at batch {b} (bucket {i + 1} of {len(sizes)})")
            mods[b] = prepare(model, tuple(_resize(e, b) for e in example), plan=plan, convert=convert,
                              fuse_plain=fuse_plain)
        check_batch_major(mods)
        inputs = [InputSpec(i.name, (-1, *i.shape[1:]), i.dtype) for i in inputs_of(mods[primary])]
        mod = merge_buckets(mods, primary)
        entries = {b: entry_name(b, primary) for b in sizes}
    say("fusing and scheduling the kernels")
    mod = optimize(mod, tgt, database, layout, winograd)
    kernels = kernel_report(mod)
    say(f"building {len(kernels)} kernels for {targets_.describe(tgt)}")
    ex = tvm.compile(mod, target=tgt, relax_pipeline=lower_pipeline(tgt))
    compiled = CompiledModel(ex, tgt, inputs, kernels, entries=entries)
    compiled.records = records if any(k.schedule == "tuned" for k in kernels) else None
    if sizes and targets_.runs_here(tgt):
        say("checking that the buckets agree sample for sample")

        def run(b: int, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
            return _flatten(compiled._call_entry(entries[b], arrays))

        check_independent(run, [(i.shape[1:], i.dtype) for i in inputs], sizes)
    return compiled


def _batch_of(example: tuple[torch.Tensor, ...], max_batch: int | None, buckets: Any) -> int:
    """The example's batch size, when a dynamic batch is asked for (checked: every input has it)."""
    if max_batch is None and buckets is None:
        return 0
    if not example or any(e.ndim == 0 for e in example):
        raise CompileError("a dynamic batch (max_batch / buckets) needs example inputs with a batch dim")
    batches = {int(e.shape[0]) for e in example}
    if len(batches) != 1:
        raise CompileError(f"the example inputs disagree on the batch size: {sorted(batches)}")
    return batches.pop()


def _resize(example: torch.Tensor, batch: int) -> torch.Tensor:
    """``example`` with ``batch`` samples (its own, repeated as needed): only the shape matters."""
    reps = -(-batch // example.shape[0])
    return example.repeat(reps, *[1] * (example.ndim - 1))[:batch].contiguous()
