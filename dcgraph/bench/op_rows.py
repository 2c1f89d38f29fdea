"""The op level's rows: what each is called and what it is to the comparison (floor, peer,
dcgraph), and the goal; shared by the level (:mod:`.op_level`) and its plot (:mod:`.op_plot`)."""

from __future__ import annotations

ROWS: dict[str, tuple[str, str]] = {  # key -> (label, family)
    "torch_conv": ("PyTorch conv alone", "floor"),
    "ort_conv": ("ONNX Runtime conv alone", "floor"),
    "torch_plain": ("PyTorch eager, plain ops", "peer"),
    "torch_fused": ("dcgraph fused op, PyTorch", "dcgraph"),
    "inductor": ("torch.compile (inductor), plain ops", "peer"),
    "ort_plain": ("ONNX Runtime, plain ops", "peer"),
    "ort_function": ("ONNX Runtime, DeepControlConv function", "dcgraph"),
    "tvm_unfused": ("TVM, plain ops (TVM's own fusion)", "peer"),
    "tvm_fused": ("dcgraph TVM fused, untuned", "dcgraph"),
    "tvm_call": ("dcgraph TVM fused, untuned, compiled(x) on torch tensors", "dcgraph"),
    "tvm_tuned": ("dcgraph TVM fused, tuned", "dcgraph"),
}
FAMILY = {k: fam for k, (_, fam) in ROWS.items()}
GOAL = 1.05
