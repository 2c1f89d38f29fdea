"""``compile``: a PyTorch model, exported program, ONNX model or Relax module -> a compiled model.

The path: norms converted to Deep Control and fused (dcgraph's torch or ONNX passes) ->
imported into Relax (fused ops become dcgraph's kernels; Deep Control left as plain ops is
fused by :mod:`.fuse_plain`): :func:`.frontends.prepare` -> TVM's fusion -> tuned records
where a database has them (:mod:`.database`), dcgraph's default schedules elsewhere
(:mod:`.schedules`) -> a Relax VM executable for the target, wrapped in a
:class:`.runtime.CompiledModel`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tvm

from . import targets as targets_
from .database import open_database
from .frontends import prepare
from .pipeline import kernel_report, lower_pipeline, optimize, uses_blocked
from .runtime import CompiledModel, InputSpec

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
) -> CompiledModel:
    """Compile ``model`` for ``target`` (preset name, dict, tag or Target).

    ``example_inputs``: a tensor or tuple for a torch model (shapes are compiled in).
    ``convert``: run dcgraph's norm-to-Deep-Control passes first. ``fuse_plain``: fuse Deep
    Control written as plain ops in Relax. ``plan``: the fused kernels' form
    (:class:`.lowering.LoweringOptions`). ``database``: a MetaSchedule database, or a directory:
    one written by ``dcgraph tune`` (the sub-database for ``target`` is used) or a single
    JSON database; its records win over the default schedules. ``layout``: ``auto`` (the blocked
    ``NCHW[x]c`` layout on CPU targets, :mod:`.layout`), ``blocked`` or ``nchw`` (the plain kernels).
    """
    tgt = targets_.resolve(target)
    uses_blocked(tgt, layout)  # an unknown layout fails here, before the import
    mod = prepare(model, example_inputs, plan=plan, convert=convert, fuse_plain=fuse_plain, shape=shape)
    if isinstance(database, str | Path):
        database = open_database(database, tgt)
    inputs = inputs_of(mod)
    mod = optimize(mod, tgt, database, layout)
    kernels = kernel_report(mod)
    ex = tvm.compile(mod, target=tgt, relax_pipeline=lower_pipeline(tgt))
    return CompiledModel(ex, tgt, inputs, kernels)
