"""ONNX passes (onnxscript rewriter rules): norm -> Deep Control conversion and conv + Deep
Control fusion, producing ``ai.dcgraph`` nodes backed by model-local functions.

:func:`rewrite_onnx` runs constant folding (no BatchNorm folding), the conversion rules,
the fusion rules, removes what became unused, attaches the ``ai.dcgraph`` functions, and
reports what matched and why anything was left alone.
"""

from __future__ import annotations

import onnx
import onnx.version_converter
import onnxscript.optimizer
from onnx_ir.passes import common as common_passes
from onnxscript import ir
from onnxscript.rewriter import RewriteRuleSet

from dcgraph import onnx_ops

from ..report import RewriteReport
from . import convert_norm, fuse_deep_control, fuse_residual
from .common import Recorder

_NORM_OPS = {"BatchNormalization": "batchnorm", "InstanceNormalization": "instancenorm",
             "GroupNormalization": "groupnorm"}


def _leftovers(model: ir.Model, rec: Recorder) -> None:
    """Report every norm still in the graph (and every mean over a conv output), with why."""
    for node in model.graph:
        if node.op_type not in _NORM_OPS and node.op_type != "ReduceMean":
            continue
        src = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        y = node.inputs[0] if node.inputs else None
        if node.op_type == "InstanceNormalization" and src is not None and src.op_type == "Reshape":
            y = src.inputs[0]  # GroupNorm written as Reshape -> InstanceNormalization -> ...
            src = y.producer() if y is not None else None
        is_conv = src is not None and src.op_type == "Conv" and src.domain in ("", "ai.onnx")
        if node.op_type == "ReduceMean" and not is_conv:
            continue
        name = node.name or node.op_type
        kind = _NORM_OPS.get(node.op_type, "deep_control (plain ops)")
        if not is_conv:
            rec.report.skipped(name, f"{kind} does not follow a convolution")
            continue
        users = {n for n, _ in y.uses()} - {n for n in model.graph if n.op_type == "Shape"}
        if node.op_type != "ReduceMean" and len(users) > 1:
            rec.report.skipped(name, f"the conv output ({src.name}) has {len(users)} users; "
                               "only the norm may read it")
            continue
        downstream = {name} | {u.name for v in node.outputs for u, _ in v.uses()}
        reason = next((r for n, r in rec.failures.items() if n in downstream), None)
        rec.report.skipped(name, reason or "no rule matched this subgraph")


def rewrite_onnx(model: onnx.ModelProto, init: str = "preserve", *, fuse: bool = True,
                 residual: bool = True) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite ``model`` (not modified); returns the new model and the report. ``residual``:
    also fold residual tails (``Add`` + activation) into ``DeepControlConvAdd``."""
    if init not in ("preserve", "fresh"):
        raise ValueError(f"init={init!r}; expected preserve or fresh")
    notes = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < onnx_ops.MIN_OPSET:  # the ai.dcgraph function bodies need CastLike
        model = onnx.version_converter.convert_version(model, onnx_ops.BODY_OPSET)
        notes.append(f"upgraded from opset {opset} to {onnx_ops.BODY_OPSET} (onnx.version_converter) "
                     f"for the {onnx_ops.DOMAIN} functions")
    # types everywhere (CastLike folds only when it knows its target type), then constants
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    ir_model = ir.serde.deserialize_model(inferred)
    onnxscript.optimizer.fold_constants(ir_model)
    for i, node in enumerate(ir_model.graph):  # reports and reasons need node names
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    rec = Recorder()
    RewriteRuleSet(convert_norm.rules(init, rec), commute=True).apply_to_model(ir_model)
    if fuse:
        RewriteRuleSet(fuse_deep_control.rules(rec), commute=True).apply_to_model(ir_model)
        if residual:
            RewriteRuleSet(fuse_residual.rules(rec), commute=True).apply_to_model(ir_model)
    for p in (common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
              common_passes.RemoveUnusedOpsetsPass()):
        p(ir_model)
    _leftovers(ir_model, rec)
    rec.report.notes.extend(notes)
    out = onnx_ops.attach_functions(ir.serde.serialize_model(ir_model))
    return out, rec.report


__all__ = ["rewrite_onnx"]
