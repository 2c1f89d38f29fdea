"""Export PyTorch models to ONNX with Deep Control intact.

- ``dcgraph::conv_deep_control`` becomes one ``ai.dcgraph.DeepControlConv`` node (a custom
  translation for torch's dynamo exporter); its function is attached *after* export, since
  the exporter inlines functions while converting opsets.
- BatchNorm stays a ``BatchNormalization`` node: the exporter's optimizer (which folds BN into
  the preceding Conv) is off; constants are folded by onnxscript's folder alone, so the graph
  is clean but every norm is still there for the ONNX passes to convert.
"""

from __future__ import annotations

import logging
import warnings

import onnx
import onnxscript
import onnxscript.optimizer
import torch
from onnx_ir.passes import common as common_passes
from onnxscript import ir
from onnxscript import opset18 as op

from dcgraph import onnx_ops

onnx_ops.register_schemas()
_dcgraph = onnxscript.values.Opset(onnx_ops.DOMAIN, onnx_ops.VERSION)


def _conv_deep_control(x, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                       negative_slope, skip=None):
    """Translation of ``dcgraph::conv_deep_control`` (an onnxscript function, traced); with a
    residual, ``DeepControlConvAdd``."""
    if bias is None:
        bias = op.Sub(b, b)  # zeros of the conv's output-channel shape and dtype
    if skip is not None:
        return _dcgraph.DeepControlConvAdd(
            x, weight, bias, a, g, b, skip, strides=list(stride), pads=list(padding) * 2,
            dilations=list(dilation), group=groups, activation=act, alpha=negative_slope)
    return _dcgraph.DeepControlConv(
        x, weight, bias, a, g, b, strides=list(stride), pads=list(padding) * 2,
        dilations=list(dilation), group=groups, activation=act, alpha=negative_slope)


TRANSLATIONS = {torch.ops.dcgraph.conv_deep_control.default: _conv_deep_control}


def export_onnx(model: torch.nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True,
                opset: int = 20) -> onnx.ModelProto:
    """``model`` (eval mode) as an ONNX model with ``ai.dcgraph`` functions attached."""
    model = model.eval()
    dyn = ({0: torch.export.Dim.AUTO},) if dynamic_batch else None
    if dynamic_batch and example.shape[0] == 1:
        example = torch.cat([example, example])  # batch 1 would specialise to a constant
    # torch's exporter logs one warning per torchvision op it cannot register (nms, roi_align,
    # ...) when torchvision is absent: irrelevant here, held back.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, optimize=False,
                                        opset_version=opset, dynamic_shapes=dyn, verbose=False,
                                        custom_translation_table=TRANSLATIONS)
    finally:
        registration.setLevel(level)
    ir_model = ir.serde.deserialize_model(program.model_proto)
    onnxscript.optimizer.fold_constants(ir_model)
    common_passes.RemoveUnusedNodesPass()(ir_model)
    common_passes.RemoveUnusedOpsetsPass()(ir_model)
    return onnx_ops.attach_functions(ir.serde.serialize_model(ir_model))
