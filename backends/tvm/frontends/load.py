"""Any supported model -> the Relax module that ``compile`` builds and ``tune`` extracts kernels from.

:func:`prepare` is the one door into the TVM backend: a ``torch.nn.Module`` (converted and
fused by dcgraph's torch passes, then exported), an ``ExportedProgram`` or ``.pt2`` archive
(:mod:`.from_torch`), an ONNX model or ``.onnx`` path (dcgraph's ONNX rules, then
:mod:`.from_onnx`), or a ``tvm.IRModule`` taken as is; then Deep Control left as plain Relax
ops is fused (:mod:`..fuse_plain`). The lowering options (``plan``) are set here, once, for
everything the import emits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm

from ..errors import CompileError
from ..lowering import options


def as_tuple(example: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors (None: none; one tensor or array: one)."""
    if example is None:
        return ()
    if isinstance(example, torch.Tensor | np.ndarray):
        example = (example,)
    return tuple(torch.as_tensor(e) for e in example)


def _dynamic(program: torch.export.ExportedProgram) -> bool:
    vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]
    return any(not isinstance(d, int) for v in vals if isinstance(v, torch.Tensor) for d in v.shape)


def _from_onnx(model: Any, example: tuple[torch.Tensor, ...], convert: bool, shape: dict | None
               ) -> tvm.IRModule:
    import onnx

    from .from_onnx import from_onnx

    if isinstance(model, str | Path):
        if not Path(model).is_file():
            raise CompileError(f"no such file: {model}")
        model = onnx.load(str(model))
    if convert:
        from dcgraph.passes.onnx import rewrite_onnx

        model, _ = rewrite_onnx(model)
    if shape is None and example:  # symbolic dims (a dynamic batch) take the example's sizes
        init = {i.name for i in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in init]
        shape = {n: tuple(e.shape) for n, e in zip(names, example, strict=False)}
    return from_onnx(model, shape=shape)


def _from_torch(model: Any, example: tuple[torch.Tensor, ...], convert: bool) -> tvm.IRModule:
    from .from_torch import from_torch

    if isinstance(model, torch.export.ExportedProgram):
        if example and _dynamic(model):
            # kernels are scheduled for static shapes (a symbolic batch ran ResNet-18 3.6x slower)
            with torch.no_grad():
                model = torch.export.export(model.module(), example)
        return from_torch(model)
    if not example:
        raise CompileError("a torch model needs example inputs (their shapes are compiled in)")
    if convert:
        from dcgraph.passes.pipeline import convert_model

        if len(example) != 1:
            raise CompileError("converting norms takes one example input; pass convert=False "
                               "for a multi-input model that is already rewritten")
        program = convert_model(model, example[0], dynamic_batch=False, verify=False).program
    else:
        with torch.no_grad():
            program = torch.export.export(model.eval(), example)
    return from_torch(program)


def import_model(model: Any, example: tuple[torch.Tensor, ...], convert: bool, shape: dict | None
                 ) -> tvm.IRModule:
    """Relax module for any supported model kind (dcgraph's passes first when ``convert``)."""
    if isinstance(model, tvm.IRModule):
        return model
    if isinstance(model, str | Path) and str(model).endswith(".pt2"):
        from dcgraph import ops  # noqa: F401 - the op must be registered before loading

        model = torch.export.load(str(model))
    if isinstance(model, str | Path) or type(model).__name__ == "ModelProto":
        return _from_onnx(model, example, convert, shape)
    if isinstance(model, torch.export.ExportedProgram | torch.nn.Module):
        return _from_torch(model, example, convert)
    raise CompileError(f"cannot compile a {type(model).__name__}: expected a torch.nn.Module, "
                       "an ExportedProgram, an ONNX model or path, or a tvm.IRModule")


def prepare(model: Any, example_inputs: Any = None, *, plan: str = "auto", convert: bool = True,
            fuse_plain: bool = True, shape: dict | None = None) -> tvm.IRModule:
    """The Relax module ``compile`` builds (and ``tune`` extracts kernels from): the model
    imported (dcgraph's passes first when ``convert``), plain-op Deep Control fused, every
    fused op lowered with ``plan`` (:class:`..lowering.LoweringOptions`)."""
    with options(plan=plan):
        mod = import_model(model, as_tuple(example_inputs), convert, shape)
        if fuse_plain:
            from ..fuse_plain import fuse_plain_deep_control

            mod, _ = fuse_plain_deep_control(mod)
    return mod
