"""Built-in models (no downloads).

- :class:`DCNet`: a small conv net whose blocks come in three variants. A *block* is
  conv -> norm -> activation. ``block="fused"`` uses ``DeepControlConv2d`` (the custom op),
  ``"plain"`` uses ``Conv2d`` + ``DeepControl2d`` (Deep Control as plain ops),
  ``"batchnorm"`` uses ``Conv2d`` + ``BatchNorm2d`` + the activation. The three variants
  have the same shapes, so they can be timed and measured side by side.
- BatchNorm models for the graph passes, written the way torchvision writes them (``nn.Sequential``
  conv-norm-act blocks, in-place ReLU, ``out += identity``, downsample branches, squeeze-and-
  excitation convs without norms): :func:`resnet18_like`, :func:`mobilenet_v2_like`,
  :func:`efficientnet_like`, :func:`vgg_like` (functional ``F.relu`` / ``.relu()`` /
  ``F.batch_norm`` forms), and :func:`two_users` (a conv whose output has two users).

``MODELS`` maps each name to ``(factory, example input shape)``. Widths are small so that
tests and CPU benchmarks stay fast; the structure (layer counts, strides, groups,
activations, residuals) is that of the real architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


# ------------------------------------------------------------------ ResNet-18 (torchvision style)

def _conv_bn_act(cin: int, cout: int, k: int, s: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18Like(nn.Module):
    """ResNet-18's structure (stem, 4 stages of 2 basic blocks, 3 downsample branches:
    20 conv + BatchNorm pairs) at a configurable width."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stages.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_like(width: int = 16, num_classes: int = 10) -> ResNet18Like:
    return ResNet18Like(width, num_classes)


# ------------------------------------------------------------------ MobileNetV2 (torchvision style)

class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, act=nn.ReLU6))
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2_like(width: int = 8, num_classes: int = 10) -> nn.Module:
    """MobileNetV2's structure (expand 1x1, depthwise 3x3, project 1x1 without activation,
    residuals; relu6) with 5 inverted-residual blocks: 16 conv + BatchNorm pairs."""
    cfg = [(1, width, 1, 1), (6, width * 2, 2, 2), (6, width * 3, 2, 2)]  # t, c, n, s
    layers: list[nn.Module] = [_conv_bn_act(3, width * 2, 3, 2, act=nn.ReLU6)]
    cin = width * 2
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(_conv_bn_act(cin, width * 8, 1, act=nn.ReLU6))
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(width * 8, num_classes))


# ------------------------------------------------------------------ EfficientNet (MBConv + SE)

class SqueezeExcitation(nn.Module):
    """torchvision's SE block: convs with bias and no norm (not conversion candidates)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn_act(cin, hidden, 1, act=nn.SiLU),
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4)),
            _conv_bn_act(hidden, cout, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


def efficientnet_like(width: int = 8, num_classes: int = 10) -> nn.Module:
    """EfficientNet-B0-style MBConv blocks (silu, depthwise, squeeze-and-excitation, residual):
    stem + 3 MBConv + head = 11 conv + BatchNorm pairs (and 6 SE convs without norms)."""
    return nn.Sequential(
        _conv_bn_act(3, width * 2, 3, 2, act=nn.SiLU),
        MBConv(width * 2, width * 2, 1, 4), MBConv(width * 2, width * 3, 2, 4),
        MBConv(width * 3, width * 3, 1, 4),
        _conv_bn_act(width * 3, width * 8, 1, act=nn.SiLU),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 8, num_classes))


# ------------------------------------------------------------------ VGG with functional forms

class VGGLike(nn.Module):
    """A VGG stack (3 stages x 2 conv-BN-relu, 6 pairs) using the functional spellings:
    ``F.relu``, ``torch.relu``, ``.relu()``, ``F.relu(inplace=True)`` and one ``F.batch_norm``."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = (width, width * 2, width * 4)
        self.convs = nn.ModuleList([nn.Conv2d(3, w[0], 3, padding=1), nn.Conv2d(w[0], w[0], 3, padding=1),
                                    nn.Conv2d(w[0], w[1], 3, padding=1), nn.Conv2d(w[1], w[1], 3, padding=1),
                                    nn.Conv2d(w[1], w[2], 3, padding=1), nn.Conv2d(w[2], w[2], 3, padding=1)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in (w[0], w[0], w[1], w[1], w[2])])
        self.bn_weight = nn.Parameter(torch.ones(w[2]))
        self.bn_bias = nn.Parameter(torch.zeros(w[2]))
        self.register_buffer("bn_mean", torch.zeros(w[2]))
        self.register_buffer("bn_var", torch.ones(w[2]))
        self.fc = nn.Linear(w[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bns[0](self.convs[0](x)))
        x = torch.relu(self.bns[1](self.convs[1](x)))
        x = F.max_pool2d(x, 2)
        x = self.bns[2](self.convs[2](x)).relu()
        x = F.relu(self.bns[3](self.convs[3](x)), inplace=True)
        x = F.max_pool2d(x, 2)
        x = F.relu6(self.bns[4](self.convs[4](x)))
        x = F.batch_norm(self.convs[5](x), self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias,
                         False, 0.1, 1e-5)
        return self.fc(F.relu(x).mean(dim=(2, 3)))


def vgg_like(width: int = 16, num_classes: int = 10) -> VGGLike:
    return VGGLike(width, num_classes)


class TwoUsers(nn.Module):
    """Negative cases: a conv whose output feeds a BatchNorm *and* a skip path, and a BatchNorm
    that does not follow a conv. One convertible pair (``conv2``/``bn2``) besides."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = torch.relu(self.bn1(y)) + y  # conv1's output has two users: not convertible
        z = torch.relu(self.bn2(self.conv2(z)))
        return self.bn3(z + 1.0)  # bn3 follows an add, not a conv


def two_users(width: int = 8) -> TwoUsers:
    return TwoUsers(width)


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (freshly
    built ones are the identity map in eval mode, which would make equivalence tests vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model


MODELS: dict[str, tuple] = {
    "resnet18": (resnet18_like, (1, 3, 64, 64)),
    "mobilenet_v2": (mobilenet_v2_like, (1, 3, 64, 64)),
    "efficientnet": (efficientnet_like, (1, 3, 64, 64)),
    "vgg": (vgg_like, (1, 3, 32, 32)),
    "two_users": (two_users, (1, 3, 16, 16)),
    "dcnet": (dcnet, (1, 3, 64, 64)),
}
