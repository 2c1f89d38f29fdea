"""Mean hoisting: the per-sample map mean of a convolution, computed from its input alone.

Spec section 3. The map mean of a convolution is linear in its input. For a conv with
weight ``W (C_out, C_in/groups, *k)``, stride ``s``, dilation ``d``, zero padding ``p`` and
output size ``O`` per spatial dim::

    T[n, ci, i...] = sum over o < O of x[n, ci, o*s + i*d - p]        (per dim, out-of-range = 0)
    m[n, c]        = 1/prod(O) * sum over ci in group(c), taps i of W[c, ci, i] * T[n, ci, i]

``T`` is a strided box sum per kernel tap. It is separable: each spatial dim is one small
matrix product with a "tap mask" ``M[i, h] = [h + p - i*d = o*s for some 0 <= o < O] / O``
(the ``1/O`` of the mean folded in), so ``T = x x_1 M_1 x_2 M_2 ...``. The cost is one read
of ``x`` with ``k`` multiply-adds per element for the last dim, less for the others, plus an
``N x C_out x (C_in/groups * |k|)`` product, which reads ``W`` once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def conv_output_size(
    in_size: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> list[int]:
    """Output spatial size of a zero-padded convolution, per dim."""
    return [
        (h + 2 * p - d * (k - 1) - 1) // s + 1
        for h, k, s, p, d in zip(in_size, kernel, stride, padding, dilation, strict=True)
    ]


@functools.lru_cache(maxsize=512)
def tap_mask(
    in_size: int, k: int, stride: int, padding: int, dilation: int, out_size: int,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """``M[i, h] = 1/out_size`` iff input position ``h`` is read by kernel tap ``i``, else 0.

    Cached (masks are tiny and shapes repeat); treat the result as read-only.
    """
    h = torch.arange(in_size, device=device)
    i = torch.arange(k, device=device)
    offset = h[None, :] + padding - i[:, None] * dilation  # = o * stride if tap i reads h at o
    hit = (offset >= 0) & (offset % stride == 0) & (offset // stride < out_size)
    return hit.to(dtype) / out_size


def tap_means(
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_size: Sequence[int],
) -> torch.Tensor:
    """``T / |O|`` of shape ``(N, C_in, *kernel)``: per tap, the mean of the inputs it reads."""
    n, c = x.shape[:2]
    nd = x.dim() - 2
    masks = [
        tap_mask(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i], out_size[i],
                 x.dtype, x.device)
        for i in range(nd)
    ]
    t = torch.matmul(x, masks[-1].t())  # (N, C, S_0..S_{nd-2}, k_last)
    done = kernel[-1]  # product of the kernel dims already contracted (flattened, trailing)
    for i in reversed(range(nd - 1)):  # (N, C, S_0..S_i, done) -> (N, C, S_0..S_{i-1}, k_i, done)
        t = torch.matmul(masks[i], t.reshape(n, c, -1, x.shape[2 + i], done))
        done = done * kernel[i]
    return t.reshape(n, c, *kernel)


def hoisted_mean(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``m (N, C_out)``: the spatial mean of ``conv(x, weight)`` (no bias), without the conv.

    Low-precision inputs accumulate in float32; the result has ``x``'s dtype.
    """
    kernel = list(weight.shape[2:])
    out_size = conv_output_size(x.shape[2:], kernel, stride, padding, dilation)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    t = tap_means(x.to(acc), kernel, stride, padding, dilation, out_size)
    n = x.shape[0]
    c_out = weight.shape[0]
    w = weight.to(acc)
    if groups == 1:
        m = torch.nn.functional.linear(t.reshape(n, -1), w.reshape(c_out, -1))
    else:
        taps = t[0].numel() // groups
        m = torch.einsum("ngk,gok->ngo", t.reshape(n, groups, taps),
                         w.reshape(groups, c_out // groups, taps)).reshape(n, c_out)
    return m.to(x.dtype)


def hoisting_pays(
    x_shape: Sequence[int], weight_shape: Sequence[int], out_size: Sequence[int]
) -> bool:
    """True if the hoisted mean moves fewer bytes than one read of the conv output would.

    Hoisting reads ``x`` and ``W`` once; the reduction over the output reads ``N*C_out*|O|``.
    In eager PyTorch neither mean fuses into the convolution, so the cheaper one wins
    (deep layers with small maps and large weights reduce the output; the TVM kernel, whose
    epilogue is fused, always hoists).
    """
    n, c_in = x_shape[0], x_shape[1]
    hoist = n * c_in
    for s in x_shape[2:]:
        hoist *= s
    w_elems = 1
    for s in weight_shape:
        w_elems *= s
    reduce_ = n * weight_shape[0]
    for o in out_size:
        reduce_ *= o
    return hoist + w_elems < reduce_
