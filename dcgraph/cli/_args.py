"""What several commands share: argument types and the model loading of ``compile`` and ``tune``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def tvm_model(spec: str, input_shape: str | None) -> tuple[object, tuple[int, ...]]:
    """(model, input shape) for compile / tune: a built-in or module:factory model (eval mode),
    a .pt2 program (needs the shape) or an .onnx model (its shape, or ``input_shape`` for symbolic dims)."""
    from dcgraph.models import check_input, load_model, parse_shape

    override = parse_shape(input_shape) if input_shape else None
    if spec.endswith((".onnx", ".pt2")):
        if not os.path.isfile(spec):
            raise ValueError(f"no such file: {spec}")
        if spec.endswith(".onnx"):
            from dcgraph.onnx_tools import load_checked

            model = load_checked(spec)
            return model, onnx_input_shape(model, override)
        if override is None:
            raise ValueError("a .pt2 program needs --input-shape (the shape it was exported with)")
        return spec, override
    model, default_shape = load_model(spec)
    shape = override or default_shape or (1, 3, 224, 224)
    check_input(model, torch.zeros(shape), spec)
    return model.eval(), shape


def onnx_input_shape(model: Any, override: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The first graph input's shape (``override`` where dims are symbolic)."""
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise ValueError(f"the ONNX model has {len(inputs)} inputs; dcgraph compile takes one")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    if override is not None:
        if len(override) != len(shape) or any(s not in (-1, o) for s, o in zip(shape, override, strict=True)):
            raise ValueError(f"--input-shape {override} does not fit the model's input {shape}")
        return tuple(override)
    if -1 in shape:
        raise ValueError(f"the ONNX input {inputs[0].name!r} has symbolic dims {shape}: give --input-shape")
    return shape


def reference_output(model: Any, example: torch.Tensor) -> torch.Tensor:
    """What the compiled model should return: PyTorch (module / program) or onnxruntime (ONNX)."""
    if type(model).__name__ == "ModelProto":
        from dcgraph.onnx_tools import run

        init = {i.name for i in model.graph.initializer}
        name = next(i.name for i in model.graph.input if i.name not in init)
        return torch.from_numpy(run(model, {name: example.numpy()})[0])
    if isinstance(model, str | Path):
        from dcgraph import ops  # noqa: F401

        model = torch.export.load(str(model))
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    with torch.no_grad():
        out = model(example)
    return out[0] if isinstance(out, tuple | list) else out
