"""The activation epilogues of the fused block: forward (in place), and their derivatives.

The memory-saving backward (spec section 4) needs ``act'(z)`` and ``z`` itself. For relu,
relu6, identity and leaky_relu with a non-negative slope both can be read back from the
block output ``out = act(z)``; for silu and hardswish (not monotonic) they cannot, and the
backward recomputes ``z`` from the saved block input instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcgraph.reference import ACTIVATIONS  # the spec's list, kept with the oracle


def check(act: str) -> str:
    """Return ``act`` if it names a supported activation, raise a readable error if not."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    return act


def apply_(z: torch.Tensor, act: str, negative_slope: float = 0.01) -> torch.Tensor:
    """``act(z)``, overwriting ``z`` (it must not be needed afterwards)."""
    if act == "identity":
        return z
    if act == "relu":
        return z.relu_()
    if act == "relu6":
        return z.clamp_(0.0, 6.0)
    if act == "leaky_relu":
        return F.leaky_relu_(z, negative_slope)
    if act == "hardswish":
        return F.hardswish(z, inplace=True)
    if act == "silu":
        return F.silu(z, inplace=True)
    raise ValueError(check(act))


def invertible(act: str, negative_slope: float = 0.01) -> bool:
    """True if ``z`` and ``act'(z)`` can be recovered from ``act(z)`` wherever ``act'(z) != 0``."""
    return act in ("identity", "relu", "relu6") or (act == "leaky_relu" and negative_slope >= 0)


def backward_from_output(
    grad: torch.Tensor, out: torch.Tensor, act: str, negative_slope: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dz, p)`` from ``out = act(z)``: ``dz = grad * act'(z)`` and ``p`` with ``p * out``
    summing like ``dz * z`` (for dg).

    Uses ATen's fused activation-backward kernels. For relu and relu6, ``dz * z == dz * out``
    (``dz`` is 0 wherever they differ); for leaky_relu, ``act'(z) * z == act(z)``, so
    ``dz * z == grad * out``. Valid only when :func:`invertible` holds.
    """
    aten = torch.ops.aten
    if act == "identity":
        return grad, grad
    if act == "relu":
        dz = aten.threshold_backward(grad, out, 0)
        return dz, dz
    if act == "relu6":
        dz = aten.hardtanh_backward(grad, out, 0.0, 6.0)
        return dz, dz
    if act == "leaky_relu":
        return aten.leaky_relu_backward(grad, out, negative_slope, True), grad
    raise ValueError(f"activation {act!r} cannot be read back from its output")


def backward_from_preact(
    grad: torch.Tensor, z: torch.Tensor, act: str, negative_slope: float = 0.01
) -> torch.Tensor:
    """``grad * act'(z)`` through ATen's fused activation-backward kernels."""
    aten = torch.ops.aten
    if act == "identity":
        return grad
    if act == "relu":
        return aten.threshold_backward(grad, z, 0)
    if act == "relu6":
        return aten.hardtanh_backward(grad, z, 0.0, 6.0)
    if act == "leaky_relu":
        return aten.leaky_relu_backward(grad, z, negative_slope, False)
    if act == "hardswish":
        return aten.hardswish_backward(grad, z)
    if act == "silu":
        return aten.silu_backward(grad, z)
    raise ValueError(check(act))
