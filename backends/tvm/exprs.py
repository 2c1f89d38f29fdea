"""Static facts about Relax expressions the CPU rewrites need: a tensor's static shape, a constant's value."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

__all__ = ["constant_value", "static_shape"]


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """``expr``'s shape if every dimension is a known integer, else None."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        return None


def constant_value(expr: relax.Expr) -> np.ndarray | None:
    """``expr``'s value if it is a tensor constant, else None."""
    value = getattr(expr, "value", None) if isinstance(expr, tvm.ir.Constant) else None
    return value.numpy() if hasattr(value, "numpy") else None
