"""Saved-activation bytes of the fused block against BatchNorm and plain-ops Deep Control.

Targets from the operator issue: one conv + DC + relu block keeps at most 2/3 of what
conv + BatchNorm + relu keeps (its input included, as the block is seen on its own); in a
stack where each block's output is the next one's saved input, the activations the stack
creates are at most half of BatchNorm's.
"""

import pytest
import torch
from torch import nn

from dcgraph import zoo
from dcgraph.memory import saved_bytes


def _stack(block: str, depth: int, width: int = 16) -> nn.Sequential:
    return nn.Sequential(*[zoo.conv_block(block, width, width) for _ in range(depth)])


def _measure(net: nn.Module, x: torch.Tensor):
    return saved_bytes(lambda: net(x), inputs=[x], modules=[net])


def test_single_block_keeps_two_thirds_of_batchnorm():
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    fused, bn = _measure(_stack("fused", 1), x), _measure(_stack("batchnorm", 1), x)
    plain = _measure(_stack("plain", 1), x)
    block = x.numel() * 4
    means = 4 * 16 * 4  # the per-sample map means (N x C), kept for a's gradient
    assert fused.with_inputs == 2 * block + means  # input and output, nothing else
    assert bn.with_inputs >= 3 * block  # input, conv output, relu output
    # the N x C means (0.3% of a block here, 0.03% at ResNet-18's layer1) aside
    assert fused.with_inputs - means <= 2 / 3 * bn.with_inputs
    assert plain.with_inputs >= 3 * block


@pytest.mark.parametrize("depth", [2, 4, 8])
def test_stack_keeps_half_of_batchnorm(depth):
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    fused, bn = _measure(_stack("fused", depth), x), _measure(_stack("batchnorm", depth), x)
    # one tensor per block, and its N x C map means
    assert fused.activations == depth * (x.numel() + 2 * 16) * 4
    assert fused.activations - depth * 2 * 16 * 4 <= 0.5 * bn.activations


def test_counts_each_storage_once():
    """relu's output saved by relu and by the next conv is one storage, counted once."""
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1, bias=False))
    mem = _measure(net, x)
    assert mem.activations == x.numel() * 4  # the relu output only
    assert mem.inputs == x.numel() * 4
