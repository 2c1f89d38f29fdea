"""CompiledModel calls on x86: tensors pass by DLPack both ways, results survive later calls,
awkward inputs (non-contiguous, misaligned, numpy) still give the right answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from dcgraph.backends import tvm as dtvm
from dcgraph.nn import DeepControlConv2d
from dcgraph.testing import relative_error

SHAPE = (2, 3, 8, 8)


class ConvAndInput(nn.Module):
    """One fused conv (flattened), and the input passed through as a second output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = DeepControlConv2d(3, 8, 3, 1, 1, bias=False, act="silu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x).flatten(1), x


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConvAndInput().eval()


@pytest.fixture(scope="module")
def compiled(model):
    return dtvm.compile(model, "x86", torch.randn(*SHAPE))


def _want(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def test_torch_in_torch_out_without_copies(model, compiled, monkeypatch):
    x = torch.randn(*SHAPE)
    assert x.is_contiguous() and x.data_ptr() % 64 == 0

    def no_copy(*_args, **_kwargs):
        raise AssertionError("copied through numpy")

    monkeypatch.setattr(tvm.runtime, "tensor", no_copy)
    monkeypatch.setattr(tvm.runtime.Tensor, "numpy", no_copy)
    y, x_out = compiled(x)
    assert isinstance(y, torch.Tensor) and isinstance(x_out, torch.Tensor)
    assert y.shape == (2, 8 * 64) and y.dtype == torch.float32
    assert relative_error(y, _want(model, x)) < 1e-4
    # the passed-through input is cloned: it does not alias the caller's tensor
    assert torch.equal(x_out, x) and x_out.data_ptr() != x.data_ptr()
    x.zero_()
    assert x_out.abs().sum() > 0


def test_results_survive_later_calls(model, compiled):
    x1, x2 = torch.randn(*SHAPE), torch.randn(*SHAPE)
    y1 = compiled(x1)[0]
    kept = y1.clone()
    y2 = compiled(x2)[0]
    y3 = compiled(x1)[0]
    assert torch.equal(y1, kept), "a later call overwrote an earlier result"
    assert not torch.equal(y1, y2) and torch.equal(y1, y3)
    assert len({y1.data_ptr(), y2.data_ptr(), y3.data_ptr()}) == 3
    assert relative_error(y2, _want(model, x2)) < 1e-4


@pytest.mark.parametrize("kind", ["strided", "channels_last", "misaligned", "requires_grad"])
def test_awkward_torch_inputs(model, compiled, kind):
    base = torch.randn(*SHAPE)
    if kind == "strided":
        x = torch.randn(2, 3, 8, 16)[..., ::2]
    elif kind == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif kind == "misaligned":
        x = torch.randn(base.numel() + 1)[1:].view(SHAPE)
        assert x.data_ptr() % 64
    else:
        x = base.clone().requires_grad_(True)
    if kind in ("strided", "channels_last"):
        assert not x.is_contiguous()
    y, x_out = compiled(x)
    assert relative_error(y, _want(model, x.detach().contiguous())) < 1e-4
    assert torch.equal(x_out, x.detach())


@pytest.mark.parametrize("aligned", [True, False])
def test_numpy_in_numpy_out(model, compiled, aligned):
    x = torch.randn(*SHAPE)
    arr = x.numpy() if aligned else np.ascontiguousarray(torch.randn(x.numel() + 1)[1:].view(SHAPE).numpy())
    y, x_out = compiled(arr)
    assert isinstance(y, np.ndarray) and isinstance(x_out, np.ndarray)
    assert relative_error(torch.from_numpy(y), _want(model, torch.from_numpy(arr))) < 1e-4
    assert np.array_equal(x_out, arr) and not np.shares_memory(x_out, arr)


def test_input_errors_keep_their_messages(compiled):
    with pytest.raises(dtvm.CompileError, match=r"^input 0 \(x\) is float64; the model takes float32$"):
        compiled(torch.randn(*SHAPE, dtype=torch.float64))
    with pytest.raises(dtvm.CompileError, match=r"^input 0 \(x\) is float64; the model takes float32$"):
        compiled(np.zeros(SHAPE))
    shape_msg = r"^input 0 \(x\) has shape \(1, 3, 8, 8\); the model was compiled for \(2, 3, 8, 8\)$"
    with pytest.raises(dtvm.CompileError, match=shape_msg):
        compiled(torch.randn(1, 3, 8, 8))
    with pytest.raises(dtvm.CompileError, match="expected 1 inputs, got 2"):
        compiled(torch.randn(*SHAPE), torch.randn(*SHAPE))
    arrays = compiled.check_inputs([torch.randn(2, 3, 8, 16)[..., ::2]])
    assert arrays[0].flags.c_contiguous and arrays[0].shape == SHAPE


def test_time_still_works(compiled):
    times = compiled.time(torch.randn(2, 3, 8, 16)[..., ::2], number=2, repeat=2)
    assert len(times) == 2 and all(t > 0 for t in times)
