"""``nn.Module``s: Deep Control after a convolution, and the fused conv + Deep Control block.

``DeepControl1d/2d/3d`` apply ``act(g * (y - a * mean_S(y)) + b)`` to a conv output ``y``
as plain ops. ``DeepControlConv1d/2d/3d`` take ``nn.ConvNd``'s arguments plus ``act=`` and
run the fused custom op; they expose ``weight``, ``bias``, ``a``, ``g``, ``b`` as parameters.

Initial values default to the paper's training-from-scratch reading (spec section 1):
``a = 1, g = 1, b = 0``, all learnable. Any of the three can be frozen
(``learn_a=False``...): it stays a parameter (in ``state_dict``, seen by tools) with
``requires_grad=False``, so optimisers skip it. There are no running statistics: ``train()``
and ``eval()`` compute the same function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dcgraph import activations
from dcgraph import functional as DF
from dcgraph.functional import conv_deep_control, deep_control

# torch.fx records these as single call_function nodes instead of tracing into their
# shape checks, so models built from these modules trace with symbolic_trace.
torch.fx.wrap("conv_deep_control")
torch.fx.wrap("deep_control")


def _check_rank(module: nn.Module, t: torch.Tensor, spatial_dims: int) -> None:
    if isinstance(t, torch.fx.Proxy):
        return
    if t.dim() != spatial_dims + 2:
        raise ValueError(f"{type(module).__name__} expects a {spatial_dims + 2}-d input "
                         f"(N, C, *spatial), got shape {tuple(t.shape)}")


def _gain_params(
    module: nn.Module, channels: int, init: tuple[float, float, float],
    learn: tuple[bool, bool, bool], factory: dict,
) -> None:
    for name, value, grad in zip(("a", "g", "b"), init, learn, strict=True):
        module.register_parameter(
            name, nn.Parameter(torch.full((channels,), float(value), **factory), requires_grad=grad))


class _DeepControlNd(nn.Module):
    """Deep Control on a raw conv output ``(N, C, *S)``; subclasses fix the number of dims S."""

    spatial_dims: int = 0

    def __init__(
        self, num_features: int, act: str = "identity", negative_slope: float = 0.01, *,
        init_a: float = 1.0, init_g: float = 1.0, init_b: float = 0.0,
        learn_a: bool = True, learn_g: bool = True, learn_b: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.act = activations.check(act)
        self.negative_slope = float(negative_slope)
        _gain_params(self, num_features, (init_a, init_g, init_b), (learn_a, learn_g, learn_b),
                     {"device": device, "dtype": dtype})

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        _check_rank(self, y, self.spatial_dims)
        if not isinstance(y, torch.fx.Proxy) and y.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got {y.shape[1]} channels")
        return deep_control(y, self.a, self.g, self.b, self.act, self.negative_slope)

    def extra_repr(self) -> str:
        frozen = [n for n in ("a", "g", "b") if not getattr(self, n).requires_grad]
        extra = f", frozen={frozen}" if frozen else ""
        return f"{self.num_features}, act={self.act!r}{extra}"


class DeepControl1d(_DeepControlNd):
    """Deep Control for ``(N, C, L)`` conv outputs."""

    spatial_dims = 1


class DeepControl2d(_DeepControlNd):
    """Deep Control for ``(N, C, H, W)`` conv outputs."""

    spatial_dims = 2


class DeepControl3d(_DeepControlNd):
    """Deep Control for ``(N, C, D, H, W)`` conv outputs."""

    spatial_dims = 3


def _ntuple(v: int | Sequence[int], nd: int) -> tuple[int, ...]:
    return (v,) * nd if isinstance(v, int) else tuple(v)


class _DeepControlConvNd(nn.Module):
    """``act(DeepControl(conv(x)))`` in one fused op; ``nn.ConvNd``'s arguments plus ``act``."""

    spatial_dims: int = 0

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1, padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
        padding_mode: str = "zeros", device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, *, act: str = "identity", negative_slope: float = 0.01,
        init_a: float = 1.0, init_g: float = 1.0, init_b: float = 0.0,
        learn_a: bool = True, learn_g: bool = True, learn_b: bool = True,
    ) -> None:
        super().__init__()
        nd = self.spatial_dims
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must "
                             f"both be divisible by groups={groups}")
        if padding_mode not in DF.PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r}; expected one of {DF.PADDING_MODES}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _ntuple(kernel_size, nd)
        self.stride = _ntuple(stride, nd)
        self.padding = padding if isinstance(padding, str) else _ntuple(padding, nd)
        self.dilation = _ntuple(dilation, nd)
        self.padding_mode = padding_mode
        self.act = activations.check(act)
        self.negative_slope = float(negative_slope)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        _gain_params(self, out_channels, (init_a, init_g, init_b), (learn_a, learn_g, learn_b),
                     factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The convolution's parameters as ``nn.ConvNd`` initialises them; a, g, b untouched."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``act(DeepControl(conv(x)) [+ skip])``: ``skip`` is a residual added before ``act``."""
        _check_rank(self, x, self.spatial_dims)
        return conv_deep_control(
            x, self.weight, self.bias, self.a, self.g, self.b, self.stride, self.padding,
            self.dilation, self.groups, self.act, self.negative_slope, self.padding_mode, skip)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1,) * self.spatial_dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", act={self.act!r}"


class DeepControlConv1d(_DeepControlConvNd):
    """Fused ``Conv1d`` + Deep Control + activation."""

    spatial_dims = 1


class DeepControlConv2d(_DeepControlConvNd):
    """Fused ``Conv2d`` + Deep Control + activation."""

    spatial_dims = 2


class DeepControlConv3d(_DeepControlConvNd):
    """Fused ``Conv3d`` + Deep Control + activation."""

    spatial_dims = 3
