"""The conv + Deep Control + activation blocks the op level measures, and their tensors.

Real ImageNet-size networks (224x224 input):

- ResNet-18: its nine distinct convolutions (``benchmarks/op_speed.py``), relu;
- MobileNetV2: an inverted-residual block at 56x56 (1x1 expand 24->144, 3x3 depthwise at
  stride 1 and 2, 1x1 project 144->24 without activation), relu6;
- EfficientNet-B0: an MBConv6 block of stage 3 at 28x28 (1x1 expand 40->240, 5x5 depthwise,
  1x1 project 240->40 without activation), silu. Its squeeze-and-excitation (convs without a
  norm) is not a Deep Control block and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import RESNET18


@dataclass(frozen=True)
class OpShape:
    name: str
    net: str  # resnet18 | mobilenet_v2 | efficientnet_b0
    cin: int
    cout: int
    size: int  # input height = width
    k: int
    stride: int
    groups: int
    act: str

    @property
    def pad(self) -> int:
        return self.k // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.pad - self.k) // self.stride + 1

    def describe(self) -> str:
        kind = "dw " if self.groups > 1 else ""
        return f"{kind}{self.cin}->{self.cout} {self.k}x{self.k}/{self.stride} @{self.size} {self.act}"

    def flops(self, batch: int) -> float:
        return 2.0 * batch * self.cout * (self.cin // self.groups) * self.k ** 2 * self.out_size ** 2

    def tensors(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        fan_in = self.cin // self.groups * self.k * self.k
        return {
            "x": torch.randn(batch, self.cin, self.size, self.size, generator=gen),
            "weight": torch.randn(self.cout, self.cin // self.groups, self.k, self.k, generator=gen)
            * (2.0 / fan_in) ** 0.5,
            "a": torch.rand(self.cout, generator=gen),  # a in [0, 1): the mean's share varies
            "g": 0.5 + torch.rand(self.cout, generator=gen),
            "b": 0.5 * torch.randn(self.cout, generator=gen),
        }


SHAPES: list[OpShape] = [
    *(OpShape(f"r18.{n}", "resnet18", ci, co, s, k, st, 1, "relu") for n, ci, co, s, k, st in RESNET18),
    OpShape("mbv2.expand", "mobilenet_v2", 24, 144, 56, 1, 1, 1, "relu6"),
    OpShape("mbv2.dw", "mobilenet_v2", 144, 144, 56, 3, 1, 144, "relu6"),
    OpShape("mbv2.dw_s2", "mobilenet_v2", 144, 144, 56, 3, 2, 144, "relu6"),
    OpShape("mbv2.project", "mobilenet_v2", 144, 24, 56, 1, 1, 1, "identity"),
    OpShape("b0.expand", "efficientnet_b0", 40, 240, 28, 1, 1, 1, "silu"),
    OpShape("b0.dw5x5", "efficientnet_b0", 240, 240, 28, 5, 1, 240, "silu"),
    OpShape("b0.project", "efficientnet_b0", 240, 40, 28, 1, 1, 1, "identity"),
]
BY_NAME = {s.name: s for s in SHAPES}
# --quick: one of each family, small enough for CI
QUICK = ["r18.layer3", "mbv2.dw", "b0.expand"]
