"""Rule: ``conv -> BatchNorm / InstanceNorm / GroupNorm [-> activation]`` becomes
``conv -> DeepControl(act)`` (spec section 2).

Initialisations:

- ``preserve``: for a norm with running statistics (BatchNorm, or InstanceNorm tracking
  them, used in eval mode), ``a = 0, g = gamma / sqrt(var + eps), b = beta - g * mean``:
  exactly what the norm computes at inference.
- ``fresh``: ``a = 1, g = gamma, b = beta``, the paper's start for training from scratch.

Norms that divide by a per-sample (or per-batch) standard deviation, which Deep Control does
not have, convert approximately (``a = 1, g = gamma, b = beta``), with a warning and
``exact=False`` in the report. A conv bias folds into ``b``:
``z = g * (W*x - a * mean(W*x)) + (b + g * (1 - a) * c0)``.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx

from dcgraph.nn import DeepControl1d, DeepControl2d, DeepControl3d

from ..report import Match, RewriteReport
from .graph import free_name, insert_module, own_module, remove_chain, shared
from .nodes import ConvSpec, NormSpec, Unsupported, conv_spec, following_act, norm_spec

INITS = ("preserve", "fresh")
_DC = {1: DeepControl1d, 2: DeepControl2d, 3: DeepControl3d}


class ApproximateConversionWarning(UserWarning):
    """A norm layer was converted to Deep Control approximately (by design)."""


def gains(norm: NormSpec, channels: int, init: str) -> tuple[torch.Tensor, ...] | Unsupported:
    """``(a, g, b, exact, note)`` for one norm layer (float64)."""
    f64 = {"dtype": torch.float64}
    gamma = norm.weight.to(**f64) if norm.weight is not None else torch.ones(channels, **f64)
    beta = norm.bias.to(**f64) if norm.bias is not None else torch.zeros(channels, **f64)
    if gamma.numel() != channels:
        return Unsupported(f"{norm.kind} has {gamma.numel()} channels, the conv {channels}")
    running = norm.running_mean is not None and norm.running_var is not None
    if init == "preserve" and norm.kind != "groupnorm" and running and (
            not norm.batch_stats or norm.training):
        g = gamma / torch.sqrt(norm.running_var.to(**f64) + norm.eps)
        b = beta - g * norm.running_mean.to(**f64)
        note = ("in training mode: matched its eval-mode output (running statistics)"
                if norm.training else "")
        return torch.zeros(channels, **f64), g, b, True, note
    if init == "fresh":
        return torch.ones(channels, **f64), gamma, beta, False, "fresh init (training from scratch)"
    why = {"batchnorm": "BatchNorm without running statistics divides by a batch std",
           "instancenorm": "InstanceNorm divides by a per-sample std",
           "groupnorm": "GroupNorm divides by a per-sample, per-group std"}[norm.kind]
    return torch.ones(channels, **f64), gamma, beta, False, f"{why}: approximate"


def convert_norms(gm: fx.GraphModule, report: RewriteReport, init: str = "preserve",
                  learn_a: bool = True) -> int:
    """Apply the rule everywhere in ``gm``; returns the number of rewrites."""
    if init not in INITS:
        raise ValueError(f"init={init!r}; expected one of {INITS}")
    count = 0
    for node in list(gm.graph.nodes):
        if node.graph is None:  # erased by an earlier rewrite
            continue
        norm = norm_spec(gm, node)
        if norm is None:
            continue
        if isinstance(norm, Unsupported):
            report.skipped(node.name, norm)
            continue
        conv = conv_spec(gm, norm.input) if isinstance(norm.input, fx.Node) else None
        if conv is None:
            report.skipped(node.name, f"{norm.kind} does not follow a convolution")
            continue
        if isinstance(conv, Unsupported):
            report.skipped(node.name, f"{norm.kind} follows an unsupported convolution: {conv}")
            continue
        if len(conv.node.users) != 1:
            report.skipped(node.name, f"the conv output ({conv.node.name}) has "
                           f"{len(conv.node.users)} users; only the norm may read it")
            continue
        result = gains(norm, conv.out_channels, init)
        if isinstance(result, Unsupported):
            report.skipped(node.name, result)
            continue
        _rewrite(gm, conv, norm, result, report, init, learn_a)
        count += 1
    return count


def _rewrite(gm, conv: ConvSpec, norm: NormSpec, result, report, init, learn_a) -> None:
    a, g, b, exact, note = result
    act = following_act(gm, norm.output)
    nodes = [conv.node.name, norm.node.name] + ([act.node.name] if act else [])
    if conv.bias is not None:  # fold c0 into b; the conv loses its bias
        b = b + g * (1 - a) * conv.bias.to(torch.float64)
        if conv.source == "module":
            own_module(gm, conv.node).register_parameter("bias", None)
        else:
            conv.node.update_arg(2, None)
    w = conv.weight
    dc = _DC[conv.nd](conv.out_channels, act=act.name if act else "identity",
                      negative_slope=act.negative_slope if act else 0.01,
                      learn_a=learn_a, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        for name, value in (("a", a), ("g", g), ("b", b)):
            getattr(dc, name).copy_(value.to(w.dtype))
    path = norm.module_path
    if path is None or shared(gm, norm.node):
        path = free_name(gm, f"{conv.node.name}_dc")
    last = act.node if act else norm.output
    new = insert_module(gm, path, dc, last, (conv.node,))
    last.replace_all_uses_with(new)
    remove_chain(gm, [n for n in (act.node if act else None, norm.output, norm.node) if n])
    if not exact and (norm.kind != "batchnorm" or init == "preserve"):
        warnings.warn(f"{nodes[1]}: {note}", ApproximateConversionWarning, stacklevel=3)
    report.matched(Match(f"conv+{norm.kind}->deep_control", tuple(nodes), norm.kind,
                         act.name if act else "identity", init, exact, note))
