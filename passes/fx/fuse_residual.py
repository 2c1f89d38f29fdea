"""Rule: a fused block's residual tail, ``act(DeepControlConvNd(x) + skip)``, becomes the
fused block called with ``skip`` (spec section 4a).

ResNet's basic and bottleneck blocks end in ``relu(bn(conv(h)) + identity)``. Once
:mod:`.fuse_deep_control` has made ``conv -> Deep Control`` one fused module (activation
identity), the add and the activation after it are still separate ops, and autograd keeps
their sum for the activation's backward. Inside the op the add costs no pass of its own and
the backward reads the mask from the block output, so the tail saves nothing extra: a basic
block then keeps two tensors (its two outputs) where BatchNorm keeps four.

Pattern (module-level and ATen graphs alike)::

    y   = call_module[DeepControlConvNd, act="identity"](x)      # y used only by the add
    s   = add(y, skip) | add(skip, y)                            # operator.add, torch.add,
                                                                 # Tensor.add, aten.add.Tensor
    out = act(s)                                                 # optional; s used only here

becomes ``out = call_module[DeepControlConvNd, act](x, skip)`` at the add's place (after
both operands). ``check`` returns the reason a candidate is left alone.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from dcgraph.nn import _DeepControlConvNd

from ..report import Match, RewriteReport
from .graph import own_module, remove_chain
from .nodes import following_act

aten = torch.ops.aten
_ADDS = (operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor)


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(lhs, rhs)`` of a plain tensor add (no ``alpha``), else None."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    if set(node.kwargs) - {"alpha"}:
        return None
    lhs, rhs = node.args
    if not (isinstance(lhs, fx.Node) and isinstance(rhs, fx.Node)):
        return None
    return lhs, rhs


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val", node.meta.get("example_value"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def check(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node] | str | None:
    """``(add, skip)`` when ``node`` (a fused block) has a residual tail to absorb, a reason
    when it has an add after it that cannot be absorbed, None when there is no add at all."""
    if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _DeepControlConvNd):
        return None
    if len(node.users) != 1:
        return None
    (add,) = node.users
    operands = _add_operands(add)
    if operands is None:
        return None
    module = gm.get_submodule(node.target)
    if module.act != "identity":
        return f"{node.name} already applies {module.act}: the add comes after the activation"
    if len(node.args) != 1 or node.kwargs:
        return f"{node.name} already takes a residual"
    skip = operands[1] if operands[0] is node else operands[0]
    if skip is node:
        return f"{add.name} adds {node.name} to itself"
    out_shape, skip_shape = _shape(node), _shape(skip)
    if out_shape is not None and skip_shape is not None:
        try:
            fits = torch.broadcast_shapes(out_shape, skip_shape) == out_shape
        except RuntimeError:
            fits = False
        if not fits:
            return f"{skip.name} {skip_shape} does not broadcast to the block output {out_shape}"
    return add, skip


def fuse_residual(gm: fx.GraphModule, report: RewriteReport) -> int:
    """Apply the rule everywhere in ``gm``; returns the number of rewrites."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        found = check(gm, node)
        if found is None:
            continue
        if isinstance(found, str):
            report.skipped(node.name, found)
            continue
        add, skip = found
        spec = following_act(gm, add)
        act_node = spec.node if spec else None
        module = own_module(gm, node)
        module.act = spec.name if spec else "identity"
        module.negative_slope = float(spec.negative_slope) if spec else 0.01
        with gm.graph.inserting_before(add):
            new = gm.graph.call_module(node.target, (node.args[0], skip))
        new.meta.update(node.meta)
        last = act_node or add
        last.replace_all_uses_with(new)
        remove_chain(gm, [node, add] + ([act_node] if act_node else []))
        names = (node.name, add.name) + ((act_node.name,) if act_node else ())
        report.matched(Match("fused+residual->fused", names, "residual", module.act))
        count += 1
    return count


__all__ = ["check", "fuse_residual"]
