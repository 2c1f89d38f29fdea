"""Rule: ``conv -> Deep Control [-> activation]`` becomes one fused ``DeepControlConvNd``
(the ``dcgraph::conv_deep_control`` op): spec section 3.

Deep Control is recognised as a ``DeepControl1d/2d/3d`` module, as a call to
``dcgraph.functional.deep_control``, or written out as plain ops in any order
(:mod:`.linear_form`). A following activation is absorbed when the Deep Control output has
no other user. The convolution keeps its bias (the fused op handles it exactly).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import fx

from dcgraph import functional as DF
from dcgraph.nn import DeepControlConv1d, DeepControlConv2d, DeepControlConv3d, _DeepControlNd

from ..report import Match, RewriteReport
from .graph import free_name, insert_module, remove_chain, shared
from .linear_form import POINTWISE, Evaluator, NotAffine, op_key
from .nodes import ConvSpec, Unsupported, attr_tensor, conv_spec, following_act

_FUSED = {1: DeepControlConv1d, 2: DeepControlConv2d, 3: DeepControlConv3d}


class Found(NamedTuple):
    """A Deep Control after a conv: its form, its last node, its parameters, and the nodes
    the fused op replaces (besides the conv)."""

    kind: str  #: module, function or plain_ops
    dc_node: fx.Node
    a: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    act: str
    negative_slope: float
    region: list[fx.Node]


def _module_form(gm, conv: ConvSpec):
    """A :class:`Found` when a DeepControl module or ``deep_control`` call follows."""
    (user,) = conv.node.users
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), _DeepControlNd):
        m = gm.get_submodule(user.target)
        return Found("module", user, m.a.detach(), m.g.detach(), m.b.detach(), m.act,
                     m.negative_slope, [user])
    if user.op == "call_function" and user.target is DF.deep_control:
        args = dict(zip(("y", "a", "g", "b", "act", "negative_slope"), user.args, strict=False))
        args.update(user.kwargs)
        try:
            a, g, b = (attr_tensor(gm, args[k]) for k in ("a", "g", "b"))
        except LookupError:
            return Unsupported("deep_control parameters are computed, not parameters")
        return Found("function", user, a, g, b, args.get("act", "identity"),
                     args.get("negative_slope", 0.01), [user])
    return None


def _plain_form(gm, conv: ConvSpec):
    """A plain-ops :class:`Found` (its region: the ops it replaces), a reason, or None."""
    y = conv.node
    region: list[fx.Node] = []
    frontier = [y]
    while frontier:  # every pointwise op reachable from y
        n = frontier.pop()
        for u in n.users:
            if u not in region and op_key(u) in POINTWISE:
                region.append(u)
                frontier.append(u)
    if not region:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    region.sort(key=order.__getitem__)
    reason = None  # why the furthest candidate failed: the most telling reason
    for exit_node in reversed(region):
        ev = Evaluator(gm, y, conv.out_channels, conv.nd)
        try:
            form = ev.node(exit_node)
        except NotAffine as e:
            reason = reason or str(e)
            continue
        if not form.q.any():
            continue
        inside = {n for n in ev.cache if n in region} | {exit_node}
        leaks = [n for n in inside | {y} if n is not exit_node and any(u not in inside for u in n.users)]
        if leaks:
            reason = reason or f"{leaks[0].name} is also used outside the Deep Control subgraph"
            continue
        if not form.p.all():
            return Unsupported("the gain on the conv output is zero in some channel")
        g = form.p
        return Found("plain_ops", exit_node, -form.q / g, g, form.r, "identity", 0.01, sorted(
            inside, key=order.__getitem__))
    reason = reason or "no Deep Control form (a per-sample map mean) after the convolution"
    return Unsupported(reason) if any(op_key(n) in ("mean", torch.mean, torch.ops.aten.mean.dim)
                                      for n in region) else None


def fuse_deep_control(gm: fx.GraphModule, report: RewriteReport) -> int:
    """Apply the rule everywhere in ``gm``; returns the number of rewrites."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.graph is None:
            continue
        conv = conv_spec(gm, node)
        if conv is None or isinstance(conv, Unsupported) or not node.users:
            continue
        found = _module_form(gm, conv) if len(node.users) == 1 else None
        if found is None:
            found = _plain_form(gm, conv)
        if found is None:
            continue
        if isinstance(found, Unsupported):
            report.skipped(node.name, found)
            continue
        kind, dc_node, a, g, b, act, slope, region = found
        act_node = None
        spec = following_act(gm, dc_node) if act == "identity" else None
        if spec is not None:
            act, slope, act_node = spec.name, spec.negative_slope, spec.node
        w = conv.weight
        fused = _FUSED[conv.nd](
            w.shape[1] * conv.groups, w.shape[0], tuple(w.shape[2:]), conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            dtype=w.dtype, device=w.device, act=act, negative_slope=slope)
        with torch.no_grad():
            fused.weight.copy_(w)
            if conv.bias is not None:
                fused.bias.copy_(conv.bias)
            for name, value in (("a", a), ("g", g), ("b", b)):
                getattr(fused, name).copy_(torch.as_tensor(value).to(w.dtype).expand(w.shape[0]))
            if kind == "module":  # keep which of a, g, b learn
                src = gm.get_submodule(dc_node.target)
                for name in ("a", "g", "b"):
                    getattr(fused, name).requires_grad_(getattr(src, name).requires_grad)
        names = [node.name, *(n.name for n in region)] + ([act_node.name] if act_node else [])
        last = act_node or dc_node
        path = conv.module_path
        if path is None or shared(gm, node):
            path = free_name(gm, f"{node.name}_fused")
        new = insert_module(gm, path, fused, last, (conv.input,))
        if "val" in node.meta:  # ATen graphs: the output's shape (the conv's), for later rules
            new.meta["val"] = node.meta["val"]
        last.replace_all_uses_with(new)
        remove_chain(gm, [node, *region] + ([act_node] if act_node else []))
        report.matched(Match("conv+deep_control->fused", tuple(names), kind, act))
        count += 1
    return count
