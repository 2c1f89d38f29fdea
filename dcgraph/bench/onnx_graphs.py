"""The ONNX side of the op level: one block as an ONNX graph (conv alone, Deep Control written out
as exporters emit it, or one ``ai.dcgraph.DeepControlConv`` node) and the ONNX Runtime session
every ORT row runs in (fixed threads, spinning off)."""

from __future__ import annotations

import numpy as np
import torch

from .shapes import OpShape

__all__ = ["onnx_model", "ort_session"]


def onnx_model(kind: str, s: OpShape, t: dict[str, torch.Tensor], opset: int = 18):
    """``conv`` (conv alone), ``plain`` (Deep Control written out as exporters emit it:
    ``y * g + (b - (a*g) * ReduceMean(y))`` then the activation) or ``function`` (one
    ``ai.dcgraph.DeepControlConv`` node with its function attached)."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from dcgraph import onnx_ops

    n = t["x"].shape[0]
    conv_attrs = {"strides": [s.stride] * 2, "pads": [s.pad] * 4, "dilations": [1, 1], "group": s.groups}
    inits = [nh.from_array(t["weight"].numpy(), "W")]
    nodes = []

    def col(name: str, v: torch.Tensor) -> str:
        inits.append(nh.from_array(v.reshape(1, -1, 1, 1).numpy().astype(np.float32), name))
        return name

    if kind == "conv":
        nodes.append(h.make_node("Conv", ["x", "W"], ["out"], **conv_attrs))
    elif kind == "plain":
        nodes.append(h.make_node("Conv", ["x", "W"], ["y"], **conv_attrs))
        inits.append(nh.from_array(np.array([2, 3], dtype=np.int64), "axes"))
        nodes += [
            h.make_node("ReduceMean", ["y", "axes"], ["m"], keepdims=1),
            h.make_node("Mul", ["m", col("ag", t["a"] * t["g"])], ["agm"]),
            h.make_node("Sub", [col("b", t["b"]), "agm"], ["o"]),
            h.make_node("Mul", ["y", col("g", t["g"])], ["yg"]),
        ]
        z = "z" if s.act != "identity" else "out"
        nodes.append(h.make_node("Add", ["yg", "o"], [z]))
        if s.act == "relu":
            nodes.append(h.make_node("Relu", [z], ["out"]))
        elif s.act == "relu6":
            inits += [nh.from_array(np.array(v, np.float32), nm) for v, nm in ((0.0, "zero"), (6.0, "six"))]
            nodes.append(h.make_node("Clip", [z, "zero", "six"], ["out"]))
        elif s.act == "silu":
            nodes += [h.make_node("Sigmoid", [z], ["sig"]), h.make_node("Mul", [z, "sig"], ["out"])]
        elif s.act != "identity":
            raise ValueError(f"no ONNX spelling here for {s.act}")
    elif kind == "function":
        for name in ("a", "g", "b"):
            inits.append(nh.from_array(t[name].numpy(), name.upper() if name != "b" else "Bo"))
        nodes.append(h.make_node("DeepControlConv", ["x", "W", "", "A", "G", "Bo"], ["out"],
                                 domain=onnx_ops.DOMAIN, activation=s.act, alpha=0.01, **conv_attrs))
    else:
        raise ValueError(kind)
    cout, ho = s.cout, s.out_size
    graph = h.make_graph(nodes, f"dc_{kind}",
                         [h.make_tensor_value_info("x", TensorProto.FLOAT, list(t["x"].shape))],
                         [h.make_tensor_value_info("out", TensorProto.FLOAT, [n, cout, ho, ho])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=10)
    if kind == "function":
        model = onnx_ops.attach_functions(model)
    onnx.checker.check_model(model)
    return model


def ort_session(model, threads: int, spinning: bool = False):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads, sequential, all graph
    optimisations; idle threads do not spin unless ``spinning`` (see :func:`spin_check`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not spinning:  # ORT's idle workers spin and take the cores from the next runtime's call
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
