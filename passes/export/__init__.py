"""The same passes on ``torch.export`` programs (ATen level).

The rules of :mod:`dcgraph.passes.fx` read ATen nodes (``aten.conv2d``, ``aten.batch_norm``,
``aten.mean.dim``...) as well as module-level ones. The exported program's module
(``ep.module()``) is rewritten in place of a copy, the rewritten blocks become dcgraph
modules, and the result is exported again, so that it saves, loads and compiles like any
exported program, with ``torch.ops.dcgraph.conv_deep_control`` nodes in it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch.export import ExportedProgram

from ..fx.convert_norm import convert_norms
from ..fx.fuse_deep_control import fuse_deep_control
from ..fx.fuse_residual import fuse_residual
from ..fx.graph import finish
from ..report import RewriteReport
from ..verify import verify


def rewrite_exported(
    ep: ExportedProgram, init: str = "preserve", *, fuse_blocks: bool = True,
    convert_norms_too: bool = True, residual: bool = True, learn_a: bool = True,
    dynamic_shapes: Any = None,
    verify_result: bool = False, rtol: float = 1e-5,
) -> tuple[ExportedProgram, RewriteReport]:
    """Rewrite an exported program and export the result again with the same example inputs.

    ``dynamic_shapes`` is passed to the re-export (the original program's constraints are not
    recovered automatically). With ``verify_result``, the new program is checked against the
    old one on the example inputs (exact rewrites only).
    """
    report = RewriteReport()
    with warnings.catch_warnings():  # torch's own deprecation noise when copying its pytrees
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        gm = copy.deepcopy(ep.module())
    if convert_norms_too:
        convert_norms(gm, report, init, learn_a)
    if fuse_blocks:
        fuse_deep_control(gm, report)
        if residual:
            fuse_residual(gm, report)
    finish(gm)
    args, kwargs = ep.example_inputs
    new_ep = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes)
    if verify_result and report.exact:
        verify(ep.module(), new_ep.module(), args, rtol)
    return new_ep, report


__all__ = ["rewrite_exported"]
