"""Built-in models (no downloads): small conv nets whose conv blocks come in three variants.

A *block* is conv -> norm -> activation. ``block="fused"`` uses ``DeepControlConv2d`` (the
custom op), ``"plain"`` uses ``Conv2d`` + ``DeepControl2d`` (Deep Control as plain ops),
``"batchnorm"`` uses ``Conv2d`` + ``BatchNorm2d`` + the activation. The three variants of
one model have the same shapes, so they can be timed and measured side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from dcgraph.nn import DeepControl2d, DeepControlConv2d

BLOCKS = ("fused", "plain", "batchnorm")

_ACT_MODULES = {
    "identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU, "hardswish": nn.Hardswish, "silu": nn.SiLU,
}


def conv_block(
    block: str, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
    act: str = "relu",
) -> nn.Module:
    """One conv -> norm -> act block in the requested variant (padding keeps the size)."""
    pad = kernel // 2
    if block == "fused":
        return DeepControlConv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False, act=act)
    conv = nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False)
    if block == "plain":
        return nn.Sequential(conv, DeepControl2d(cout, act=act))
    if block == "batchnorm":
        return nn.Sequential(conv, nn.BatchNorm2d(cout), _ACT_MODULES[act]())
    raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")


class DCNet(nn.Module):
    """A small VGG-style classifier: stages of conv blocks, each stage halving the map.

    ``widths=(16, 32, 64)`` and ``per_stage=2`` give six conv blocks; the classifier is a
    global average pool and a linear layer.
    """

    def __init__(
        self, block: str = "fused", in_channels: int = 3, num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64), per_stage: int = 2, act: str = "relu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            for j in range(per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(conv_block(block, cin, w, 3, stride, act=act))
                cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def dcnet(block: str = "fused", **kwargs) -> DCNet:
    """The demo network (see :class:`DCNet`)."""
    return DCNet(block=block, **kwargs)


MODELS = {"dcnet": dcnet}
