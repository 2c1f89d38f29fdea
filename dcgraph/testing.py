"""What the tests and the benchmarks share: the conv configurations every implementation (custom
op, modules, passes, ONNX, each TVM target) is tested against :mod:`dcgraph.reference` on, and
the one relative-error measure their comparisons use.

Each case is small enough for gradcheck and emulated-ARM runs; together they cover stride,
padding, dilation, groups (incl. depthwise), 1x1 and large kernels, odd and tiny maps,
batch 1, conv bias, and 1-d / 3-d convolutions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dcgraph.compare import relative_error
from dcgraph.reference import ACTIVATIONS


@dataclass(frozen=True)
class ConvCase:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: tuple[int, ...]  # input spatial size
    kernel: tuple[int, ...]
    stride: tuple[int, ...] = field(default=None)  # type: ignore[assignment]
    padding: tuple[int, ...] = field(default=None)  # type: ignore[assignment]
    dilation: tuple[int, ...] = field(default=None)  # type: ignore[assignment]
    groups: int = 1
    bias: bool = False
    act: str = "relu"

    def __post_init__(self) -> None:
        nd = len(self.size)
        for name, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, (default,) * nd)

    def tensors(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
        """Input, conv weight (and bias), and a, g, b away from their trivial values."""
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, dtype=dtype)

        c = self.out_channels
        return {
            "x": rand(self.batch, self.in_channels, *self.size),
            "weight": rand(c, self.in_channels // self.groups, *self.kernel) * 0.5,
            "bias": rand(c) if self.bias else None,
            "a": 0.5 + torch.rand(c, generator=gen, dtype=dtype),  # 0.5 .. 1.5
            "g": 0.5 + torch.rand(c, generator=gen, dtype=dtype),
            "b": rand(c) * 0.5,
        }

    def conv_kwargs(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "groups": self.groups}


CASES = [
    ConvCase("basic3x3", 2, 4, 6, (8, 8), (3, 3), padding=(1, 1)),
    ConvCase("batch1", 1, 3, 5, (7, 9), (3, 3), padding=(1, 1), bias=True),
    ConvCase("stride2", 2, 4, 4, (9, 9), (3, 3), stride=(2, 2), padding=(1, 1)),
    ConvCase("stride3_pad2", 2, 3, 4, (11, 10), (5, 5), stride=(3, 3), padding=(2, 2)),
    ConvCase("dilation2", 2, 4, 4, (10, 9), (3, 3), padding=(2, 2), dilation=(2, 2)),
    ConvCase("groups2", 2, 4, 6, (7, 7), (3, 3), padding=(1, 1), groups=2, act="relu6"),
    ConvCase("depthwise", 2, 6, 6, (9, 7), (3, 3), stride=(2, 2), padding=(1, 1), groups=6,
             act="relu6"),
    ConvCase("pointwise", 3, 8, 5, (5, 6), (1, 1), act="identity"),
    ConvCase("kernel7", 1, 3, 4, (13, 12), (7, 7), stride=(2, 2), padding=(3, 3), bias=True),
    ConvCase("odd_tiny", 2, 3, 3, (3, 2), (3, 1), padding=(1, 0), act="silu"),
    ConvCase("one_pixel_out", 2, 2, 3, (3, 3), (3, 3), act="hardswish"),
    ConvCase("asym", 2, 2, 3, (8, 6), (3, 1), stride=(2, 1), padding=(0, 1), dilation=(1, 2),
             act="leaky_relu"),
    ConvCase("conv1d", 2, 3, 4, (11,), (3,), stride=(2,), padding=(1,), bias=True),
    ConvCase("conv3d", 1, 2, 3, (4, 5, 5), (3, 3, 3), padding=(1, 1, 1), act="silu"),
]

CASE_IDS = [c.name for c in CASES]
#: Larger than the shared cases, so that the GPU conv schedule keeps its full register tiles
#: (4 channels x 2 columns per thread) and loops over several input-channel chunks; the shared
#: cases are so small that it shrinks the tiles to one output per thread.
GPU_TILE_CASES = [
    ConvCase("tile_w2", 4, 16, 32, (64, 64), (3, 3), padding=(1, 1)),
    ConvCase("tile_w2_stride2", 8, 12, 16, (128, 128), (3, 3), stride=(2, 2), padding=(1, 1), bias=True,
             act="silu"),
]
BATCHES = (1, 4)


#: The spellings of Deep Control after a conv that every plain-ops matcher must recognise: the
#: torch.fx rule (``passes/fx/linear_form.py``: any affine form), the ONNX rules
#: (``passes/onnx/fuse_deep_control.py``: as exporters emit these) and the Relax fusion
#: (``backends/tvm/fuse_plain.py``: as ``torch.export`` emits these). ``tests/test_forms.py``
#: runs each through all three; a new spelling goes here first. Each is ``z(y, m, a, g, b)``,
#: ``m`` the per-sample map mean of ``y``, ``a, g, b`` shaped ``(1, C, 1, 1)``.
DC_FORMS: dict[str, Callable[..., torch.Tensor]] = {
    "g(y-am)+b": lambda y, m, a, g, b: g * (y - a * m) + b,
    "(y-ma)g+b": lambda y, m, a, g, b: (y - m * a) * g + b,
    "(y-am)g+b": lambda y, m, a, g, b: (y - a * m) * g + b,
    "yg-m(ag)+b": lambda y, m, a, g, b: y * g - m * (a * g) + b,
    "yg+(b-agm)": lambda y, m, a, g, b: y * g + (b - a * g * m),  # dcgraph's DeepControl2d, plain
}


#: the activations as the torch ops models are written with (what the matchers see after tracing)
_TORCH_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda v: v, "relu": torch.relu, "relu6": torch.nn.functional.relu6,
    "silu": torch.nn.functional.silu, "hardswish": torch.nn.functional.hardswish}


class PlainDeepControl(nn.Module):
    """``act(form(conv(x)))``: a conv, then Deep Control written as plain ops in one spelling of
    :data:`DC_FORMS` (a, g, b away from their trivial values), then the activation."""

    def __init__(self, form: str, act: str = "relu", channels: tuple[int, int] = (3, 6),
                 seed: int = 0) -> None:
        super().__init__()
        self.form, self.act = form, act
        self.conv = nn.Conv2d(channels[0], channels[1], 3, padding=1, bias=False)
        gen = torch.Generator().manual_seed(seed)
        for name in "agb":
            self.register_parameter(name, nn.Parameter(0.5 + torch.rand(1, channels[1], 1, 1, generator=gen)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = DC_FORMS[self.form](y, y.mean(dim=(2, 3), keepdim=True), self.a, self.g, self.b)
        return _TORCH_ACTS[self.act](z)


def live_mean(model: nn.Module, seed: int = 0, low: float = 0.5, high: float = 1.5) -> nn.Module:
    """``model``'s norms converted to Deep Control modules (the exact ``preserve`` init), then every
    ``a`` drawn from ``[low, high)``: the per-sample mean term is live in every block.

    The result is the eager reference for whole-model checks: a model converted from BatchNorm
    with ``preserve`` has ``a = 0``, where the mean term (the hoisted shift's taps, its stride,
    ``a`` itself) drops out and a broken mean path cannot be seen. Its Deep Control modules run
    as plain ops (:func:`dcgraph.functional.deep_control`); ``compile`` fuses them like any other.
    """
    from dcgraph.nn import _DeepControlNd
    from dcgraph.passes.fx import convert

    converted, report = convert(model.eval())
    if not report.matches:
        raise ValueError("the model has no conv + norm block to convert")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in converted.modules():
            if isinstance(m, _DeepControlNd):
                m.a.copy_(low + (high - low) * torch.rand(m.a.shape, generator=gen))
    return converted.eval()


def with_batch(case: ConvCase, batch: int) -> ConvCase:
    """``case`` at another batch size (named ``<name>-b<batch>``)."""
    return dataclasses.replace(case, name=f"{case.name}-b{batch}", batch=batch)


def batch_cases(batches: tuple[int, ...] = BATCHES) -> list[ConvCase]:
    """Every shared case at each batch size (batch 1 and 4 by default)."""
    return [with_batch(c, b) for c in CASES for b in batches]


__all__ = ["ACTIVATIONS", "BATCHES", "CASES", "CASE_IDS", "DC_FORMS", "GPU_TILE_CASES", "ConvCase",
           "PlainDeepControl", "batch_cases", "live_mean", "relative_error", "with_batch"]
