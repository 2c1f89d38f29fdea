"""Run the original and the rewritten model on the same inputs and compare."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from dcgraph.compare import leaves, relative_error


class VerificationError(AssertionError):
    """An exact rewrite changed what the model computes."""


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in leaves(out) if isinstance(t, torch.Tensor)]


def _set_mode(m: nn.Module, training: bool) -> nn.Module:
    with contextlib.suppress(NotImplementedError):  # exported programs' modules have one mode
        m.train(training)
    return m


def verify(original: nn.Module, rewritten: nn.Module, inputs: Sequence[torch.Tensor],
           rtol: float = 1e-5) -> float:
    """Worst relative error of ``rewritten`` against ``original``, both in eval mode (the
    modes are restored afterwards); raises :class:`VerificationError` above ``rtol``."""
    modes = [(m, m.training) for m in (original, rewritten)]
    try:
        with torch.no_grad():
            ref = _leaves(_set_mode(original, False)(*inputs))
            got = _leaves(_set_mode(rewritten, False)(*inputs))
    finally:
        for m, training in modes:
            _set_mode(m, training)
    if len(ref) != len(got):
        raise VerificationError(f"the rewritten model returns {len(got)} tensors, the original {len(ref)}")
    worst = 0.0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        if r.shape != g.shape:
            raise VerificationError(f"output {i}: shape {tuple(g.shape)} != {tuple(r.shape)}")
        err = relative_error(g, r)
        if not err <= rtol:  # also catches NaN
            raise VerificationError(f"output {i}: relative error {err:.2e} > {rtol:.0e}")
        worst = max(worst, err)
    return worst
