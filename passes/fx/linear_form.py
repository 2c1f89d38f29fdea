"""Recognise Deep Control written as plain ops, in whatever order people write it.

Instead of one pattern per spelling (``g * (y - a * m) + b``, ``(y - m * a) * g + b``,
``b + g * y - g * a * m``, ...), the subgraph after a convolution output ``y`` is evaluated
symbolically as a per-channel affine form in ``y`` and its spatial mean ``m``::

    value = P * y + Q * m + R          (P, Q, R per-channel constants)

Leaves are ``y``, ``mean_S(y)`` (keepdim, exactly the spatial dims), parameters/buffers
broadcasting per channel, and Python numbers; ``+ - * /`` and negation combine them as long as
the result stays affine (a product of two non-constant values fails). A form with ``Q != 0``
is Deep Control with ``g = P``, ``a = -Q / P``, ``b = R``.

The spellings all three plain-ops matchers (this one, the ONNX rules, the Relax fusion) are
tested on are one table, :data:`dcgraph.testing.DC_FORMS` (``tests/test_forms.py``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .nodes import attr_tensor

aten = torch.ops.aten

_ADD = {operator.add, torch.add, aten.add.Tensor, aten.add.Scalar, "add"}
_SUB = {operator.sub, torch.sub, aten.sub.Tensor, aten.sub.Scalar, "sub"}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar, "mul"}
_DIV = {operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar, "div"}
_NEG = {operator.neg, torch.neg, aten.neg.default, "neg"}
_MEAN = {torch.mean, aten.mean.dim, "mean"}
POINTWISE = _ADD | _SUB | _MUL | _DIV | _NEG | _MEAN


class NotAffine(Exception):
    """The subgraph is not a per-channel affine form of y and mean(y)."""


@dataclass
class Form:
    """``P * y + Q * m + R``; each term a float64 ``(C,)`` tensor. A constant has P = Q = 0."""

    p: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor

    @property
    def constant(self) -> bool:
        return not (self.p.any() or self.q.any())

    def __add__(self, o: Form) -> Form:
        return Form(self.p + o.p, self.q + o.q, self.r + o.r)

    def scale(self, s: torch.Tensor) -> Form:
        return Form(self.p * s, self.q * s, self.r * s)


def op_key(node: fx.Node) -> Any:
    """The op a node applies (its function, or its method name); None for other nodes."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return node.target
    return None


class Evaluator:
    """Evaluates nodes as :class:`Form` relative to one conv output ``y`` of rank ``nd + 2``."""

    def __init__(self, gm: fx.GraphModule, y: fx.Node, channels: int, nd: int) -> None:
        self.gm, self.y, self.c, self.nd = gm, y, channels, nd
        self.cache: dict[fx.Node, Form] = {}
        self.means: set[fx.Node] = set()

    def _const(self, v: torch.Tensor | float) -> Form:
        zeros = torch.zeros(self.c, dtype=torch.float64)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return Form(zeros, zeros.clone(), torch.full((self.c,), float(v), dtype=torch.float64))
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise NotAffine(f"unsupported constant {type(v).__name__}")
        shape = list(v.shape)
        rank = self.nd + 2
        if len(shape) > rank:
            raise NotAffine(f"constant of shape {tuple(shape)} does not broadcast per channel")
        shape = [1] * (rank - len(shape)) + shape
        if any(s != 1 for i, s in enumerate(shape) if i != 1) or shape[1] not in (1, self.c):
            raise NotAffine(f"constant of shape {tuple(v.shape)} is not per channel")
        vec = v.reshape(-1).to(torch.float64).expand(self.c).clone()
        return Form(zeros, zeros.clone(), vec)

    def value(self, arg: Any) -> Form:
        if isinstance(arg, fx.Node):
            return self.node(arg)
        return self._const(arg)

    def node(self, n: fx.Node) -> Form:
        if n in self.cache:
            return self.cache[n]
        form = self._eval(n)
        self.cache[n] = form
        return form

    def _eval(self, n: fx.Node) -> Form:
        zeros = torch.zeros(self.c, dtype=torch.float64)
        if n is self.y:
            return Form(torch.ones(self.c, dtype=torch.float64), zeros, zeros.clone())
        if n.op == "get_attr":
            return self._const(attr_tensor(self.gm, n))
        key = op_key(n)
        if key is None or key not in POINTWISE:
            raise NotAffine(f"{n.name} ({key}) is not an affine op")
        args, kwargs = n.args, n.kwargs
        if key in _MEAN:
            return self._mean(n)
        if key in _NEG:
            return self.value(args[0]).scale(torch.tensor(-1.0, dtype=torch.float64))
        lhs, rhs = self.value(args[0]), self.value(args[1])
        if key in _ADD or key in _SUB:
            alpha = kwargs.get("alpha", 1)
            rhs = rhs.scale(torch.tensor(float(alpha) * (1 if key in _ADD else -1), dtype=torch.float64))
            return lhs + rhs
        if key in _MUL:
            if lhs.constant:
                return rhs.scale(lhs.r)
            if rhs.constant:
                return lhs.scale(rhs.r)
            raise NotAffine(f"{n.name} multiplies two non-constant values")
        if key in _DIV:
            if not rhs.constant or kwargs.get("rounding_mode") is not None:
                raise NotAffine(f"{n.name} divides by a non-constant value")
            if not rhs.r.all():
                raise NotAffine(f"{n.name} divides by zero")
            return lhs.scale(1.0 / rhs.r)
        raise NotAffine(f"{n.name}: unhandled op")

    def _mean(self, n: fx.Node) -> Form:
        args, kwargs = n.args, n.kwargs
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if dims is None or not keepdim or kwargs.get("dtype") is not None:
            raise NotAffine(f"{n.name}: a mean must be over the spatial dims with keepdim=True")
        rank = self.nd + 2
        dims = {d % rank for d in ((dims,) if isinstance(dims, int) else dims)}
        if dims != set(range(2, rank)):
            raise NotAffine(f"{n.name}: mean over dims {sorted(dims)}, not the spatial dims")
        inner = self.value(args[0])
        self.means.add(n)
        # mean_S(P * y + Q * m + R) = (P + Q) * m + R
        return Form(torch.zeros_like(inner.p), inner.p + inner.q, inner.r)
