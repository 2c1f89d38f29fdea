"""torch.export programs into Relax, with ``dcgraph::conv_deep_control`` mapped to the fused kernels.

TVM's exported-program importer takes a ``custom_convert_map`` keyed by op name; the entry
here reads the op's arguments and calls :func:`..lowering.emit_conv_deep_control`, so every
fused block becomes dcgraph's two kernels instead of a conv, a mean and an elementwise chain.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import tvm
from torch import fx
from tvm.relax.frontend.torch import from_exported_program

from dcgraph import ops  # noqa: F401 - registers dcgraph::conv_deep_control before programs load

from ..lowering import emit_conv_deep_control

OP_NAME = "conv_deep_control.default"


class ImportError_(ValueError):
    """A program TVM's importer cannot take, with the reason in one line."""


def convert_conv_deep_control(node: fx.Node, importer: Any) -> tvm.relax.Var:
    """One ``dcgraph::conv_deep_control`` call -> dcgraph's fused kernels (the plan in force:
    :func:`..lowering.options`)."""
    args = importer.retrieve_args(node)
    names = ("x", "weight", "bias", "a", "g", "b", "stride", "padding", "dilation", "groups",
             "act", "negative_slope", "skip")
    values = dict(zip(names, args, strict=False))
    for k, v in node.kwargs.items():
        values[k] = importer.env[v] if isinstance(v, fx.Node) else v
    return emit_conv_deep_control(
        importer.block_builder, values["x"], values["weight"], values["bias"], values["a"],
        values["g"], values["b"], stride=values["stride"], padding=values["padding"],
        dilation=values["dilation"], groups=values["groups"], act=values["act"],
        negative_slope=values["negative_slope"], skip=values.get("skip"))


def from_torch(program: torch.export.ExportedProgram) -> tvm.IRModule:
    """Import an exported program (parameters bound as constants) into a Relax module ``main``.

    Lowering options (the plan) come from :func:`..lowering.options`."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"expected a torch.export.ExportedProgram, got {type(program).__name__}")
    for node in program.graph.nodes:
        if node.op == "call_function" and "conv_deep_control_backward" in str(node.target):
            raise ImportError_("the program contains the training backward of the fused op; "
                               "export the model in eval mode under torch.no_grad()")
    # Without torch's decompositions first: they re-trace the whole program (1.5-2 s of a
    # ResNet-18 compile) and TVM converts the undecomposed ATen ops dcgraph's models use (with
    # ``adaptive_avg_pool2d`` and ``silu`` given blocked / fast forms). An op TVM only knows
    # decomposed (or converts only in its decomposed form) retries the import with them, so
    # nothing TVM imported before fails now.
    try:
        return _import(program, decompose=False)
    except Exception:  # any failure of the shortcut: the full path decides
        pass
    try:
        return _import(program, decompose=True)
    except KeyError as err:  # TVM's importer raises KeyError for an ATen op it has no converter for
        raise ImportError_(f"TVM's torch importer has no converter for {err}; "
                           "the op must be removed or rewritten before compiling") from None


def _import(program: torch.export.ExportedProgram, decompose: bool) -> tvm.IRModule:
    with warnings.catch_warnings():  # torch's own noise when run_decompositions copies its pytrees
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return from_exported_program(program, custom_convert_map={OP_NAME: convert_conv_deep_control},
                                     unwrap_unit_return_tuple=True, run_ep_decomposition=decompose)
