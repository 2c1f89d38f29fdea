"""The one way dcgraph compares a result with its reference: the CLI's ``--verify``, the demo, the
graph passes' verification, the benchmark harness and the tests all go through here.

``relative_error(got, want) = max |got - want| / max |want|`` in float64: one scale-free number
per output. NaN or infinity anywhere, or a shape mismatch, gives ``inf``, so a broken output can
never pass a tolerance check (``max`` over NaN would silently keep the finite value).
:func:`worst_error` compares every output of a tuple / list / dict, and a different number of
outputs is a mismatch too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["leaves", "relative_error", "worst_error"]


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (any float dtype: bfloat16 has no numpy twin)
        value = value.detach().cpu().double().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a TVM tensor
        value = value.numpy()
    return np.asarray(value, dtype=np.float64)


def relative_error(got: Any, want: Any) -> float:
    """``max |got - want| / max |want|`` (``inf`` for a shape mismatch, NaN or infinity)."""
    return _relative(_array(got), _array(want))


def _relative(g: np.ndarray, w: np.ndarray) -> float:
    if g.shape != w.shape:
        return math.inf
    if g.size == 0:
        return 0.0
    err = float(np.abs(g - w).max() / max(float(np.abs(w).max()), 1e-30))
    return err if math.isfinite(err) else math.inf


def leaves(out: Any) -> list[Any]:
    """The tensors of a (nested) tuple / list / dict output, in order."""
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in leaves(v)]
    return [out]


def worst_error(got: Any, want: Any) -> tuple[float, str]:
    """(worst relative error over every output, where it is: ``"output i"`` or what differs)."""
    gl, wl = leaves(got), leaves(want)
    if len(gl) != len(wl):
        return math.inf, f"{len(gl)} outputs where the reference has {len(wl)}"
    worst, where = 0.0, "output 0"
    for i, (g, w) in enumerate(zip(gl, wl, strict=True)):
        g, w = _array(g), _array(w)  # once each
        if g.shape != w.shape:
            return math.inf, f"output {i} has shape {g.shape}, the reference {w.shape}"
        err = _relative(g, w)
        if not err <= worst:
            worst, where = err, f"output {i}"
    return worst, where
