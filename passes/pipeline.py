"""The end-to-end model rewrite behind ``dcgraph convert``: export, convert, fuse, verify.

The torch.export route is used because it traces more real code than torch.fx's symbolic
tracing (data-dependent padding, TorchScript helpers); the result is an ``ExportedProgram``
with ``dcgraph::conv_deep_control`` nodes, ready to save, load, compile or lower.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import ExportedProgram

from .export import rewrite_exported
from .report import RewriteReport
from .verify import VerificationError, relative_error


@dataclass
class ConvertResult:
    program: ExportedProgram
    report: RewriteReport
    float32_error: float | None = None  #: rewritten vs original, float32, on the example input
    float64_error: float | None = None  #: the same computed in float64: the exactness check


def convert_model(
    model: nn.Module, example: torch.Tensor, init: str = "preserve", *, fuse_blocks: bool = True,
    dynamic_batch: bool = True, verify: bool = True, rtol64: float = 1e-9,
) -> ConvertResult:
    """Rewrite ``model`` (in eval mode; it is not modified) into an exported program.

    With ``verify``, an exact rewrite is checked in float64, where rounding cannot hide a
    wrong rewrite (float32 noise through a deep random-weight net reaches 1e-5..1e-4), and
    the float32 difference is reported alongside.
    """
    model = copy.deepcopy(model).eval()
    dyn = None
    if dynamic_batch:  # AUTO: dynamic where the model allows; batch 2 avoids 0/1 specialisation
        dyn = ({0: torch.export.Dim.AUTO},)
        if example.shape[0] == 1:
            example = torch.cat([example, example])
    ep = torch.export.export(model, (example,), dynamic_shapes=dyn)
    new_ep, report = rewrite_exported(ep, init, fuse_blocks=fuse_blocks, dynamic_shapes=dyn)
    result = ConvertResult(new_ep, report)
    if verify and report.exact and report.matches:
        with torch.no_grad():
            result.float32_error = relative_error(new_ep.module()(example), model(example))
            m64 = copy.deepcopy(model).double()
            x64 = example.double()
            ep64 = torch.export.export(m64, (x64,))
            new64, _ = rewrite_exported(ep64, init, fuse_blocks=fuse_blocks)
            result.float64_error = relative_error(new64.module()(x64), m64(x64))
        if not result.float64_error <= rtol64:
            raise VerificationError(f"the rewritten model differs from the original in float64: "
                                    f"relative error {result.float64_error:.2e} > {rtol64:.0e}")
    return result
