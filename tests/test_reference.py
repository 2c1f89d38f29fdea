"""The oracle checked against the spec's definition from first principles.

Everything else is tested against :mod:`dcgraph.reference`; these tests make sure the
oracle itself says what section 1 of the spec says, with explicit loops and special cases.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dcgraph import reference as R

D = torch.float64


def _loop_deep_control(y, a, g, b):
    """Section 1 of the spec, element by element."""
    n, c = y.shape[:2]
    out = torch.empty_like(y)
    for i, j in itertools.product(range(n), range(c)):
        m = y[i, j].sum() / y[i, j].numel()
        out[i, j] = g[j] * (y[i, j] - a[j] * m) + b[j]
    return out


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 2, 4, 3), (2, 2, 2, 3, 2)])
def test_matches_elementwise_definition(shape):
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(*shape, generator=gen, dtype=D)
    a, g, b = (torch.randn(shape[1], generator=gen, dtype=D) for _ in range(3))
    torch.testing.assert_close(R.deep_control(y, a, g, b), _loop_deep_control(y, a, g, b))


def test_a1_is_mean_subtraction_and_a0_is_affine():
    y = torch.randn(3, 4, 6, 5, dtype=D) + 3.0
    ones, zeros = torch.ones(4, dtype=D), torch.zeros(4, dtype=D)
    centred = R.deep_control(y, ones, ones, zeros)
    torch.testing.assert_close(centred.mean(dim=(2, 3)), torch.zeros(3, 4, dtype=D))
    g, b = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    torch.testing.assert_close(R.deep_control(y, zeros, g, b), y * g[:, None, None] + b[:, None, None])


def test_activations_match_torch():
    z = torch.linspace(-8, 8, 1001, dtype=D)
    expected = {"identity": z, "relu": F.relu(z), "relu6": F.relu6(z),
                "leaky_relu": F.leaky_relu(z, 0.2), "hardswish": F.hardswish(z), "silu": F.silu(z)}
    for act in R.ACTIVATIONS:
        torch.testing.assert_close(R.activation(z, act, 0.2), expected[act], msg=act)
    with pytest.raises(ValueError, match="unknown activation"):
        R.activation(z, "gelu")


def test_padding_modes_match_torch_conv():
    x = torch.randn(2, 3, 7, 6, dtype=D)
    conv = torch.nn.Conv2d(3, 4, 3, padding=(2, 1), padding_mode="reflect", dtype=D)
    torch.testing.assert_close(
        R.conv(x, conv.weight, conv.bias, padding=(2, 1), padding_mode="reflect"), conv(x))
