"""torch.fx passes: norm -> Deep Control conversion and conv + Deep Control fusion.

The rules read module-level graphs (``symbolic_trace``) and ATen-level graphs
(``torch.export``'s ``ep.module()``) alike; see :mod:`dcgraph.passes.export` for the latter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from ..report import RewriteReport
from ..verify import verify
from .convert_norm import INITS, ApproximateConversionWarning, convert_norms
from .fuse_deep_control import fuse_deep_control
from .fuse_residual import fuse_residual
from .graph import TraceFailure, finish, trace


def convert(model: nn.Module, init: str = "preserve", *, learn_a: bool = True,
            report: RewriteReport | None = None) -> tuple[fx.GraphModule, RewriteReport]:
    """``conv -> norm [-> act]`` becomes ``conv -> DeepControl(act)``; ``model`` is untouched."""
    report = report if report is not None else RewriteReport()
    gm = trace(model)
    convert_norms(gm, report, init, learn_a)
    return finish(gm), report


def fuse(model: nn.Module, *, residual: bool = True, report: RewriteReport | None = None
         ) -> tuple[fx.GraphModule, RewriteReport]:
    """``conv -> Deep Control [-> act]`` becomes one ``DeepControlConvNd``; with ``residual``,
    a following ``+ skip [-> act]`` joins it (the fused block called with ``skip``)."""
    report = report if report is not None else RewriteReport()
    gm = trace(model)
    fuse_deep_control(gm, report)
    if residual:
        fuse_residual(gm, report)
    return finish(gm), report


def rewrite(model: nn.Module, init: str = "preserve", *, fuse_blocks: bool = True,
            residual: bool = True, learn_a: bool = True,
            verify_inputs: Sequence[torch.Tensor] | None = None,
            rtol: float = 1e-5) -> tuple[fx.GraphModule, RewriteReport]:
    """Convert, then fuse (residual tails too, unless ``residual=False``); with
    ``verify_inputs``, check the result against ``model`` (all exact) or the fusion against
    the conversion (when some conversions are approximate)."""
    converted, report = convert(model, init, learn_a=learn_a)
    result = converted
    if fuse_blocks:
        result, _ = fuse(converted, residual=residual, report=report)
    if verify_inputs is not None:
        if report.exact:
            verify(model, result, verify_inputs, rtol)
        elif fuse_blocks:
            verify(converted, result, verify_inputs, rtol)
    return result, report


__all__ = ["INITS", "ApproximateConversionWarning", "TraceFailure", "convert", "fuse", "fuse_residual",
           "rewrite", "trace"]
