"""Train small CNNs on real data to check the paper's claims: Deep Control vs batch norm.

Data: scikit-learn's handwritten digits (``load_digits``: 1,797 8x8 grey images, 10 classes,
shipped with the package, no download), split 80/20 stratified with a fixed seed, pixels
scaled to [0, 1] and standardised with the training split's mean and std.

Networks (every conv block is conv -> norm -> relu):

- ``shallow``: 3 blocks (16, 32, 32 channels; a 2x2 max-pool after the second), global
  average pool, linear.
- ``deep``: a plain stack of 12 blocks of 16 channels at 8x8, no residual connections (the
  regime where an unnormalised net struggles), global average pool, linear.

Norms: ``none`` (conv with bias), ``batchnorm``, ``groupnorm`` (4 groups), ``deepcontrol``
(the fused op, the paper's from-scratch init a = 1, g = 1, b = 0, all learnable) and
``deepcontrol_frozen_a`` (a fixed at 1). Conv weights: He initialisation (``init="he"``), or
channel-wise zero-mean filters with unit norm per output channel (``init="zero_mean"``,
:mod:`dcgraph.mean_shift`; ``"zero_mean_he"``: norm sqrt(2), He's expected norm);
``msr=True`` also subtracts each filter's gradient mean at every step (Mean Shift Rejection,
arXiv 1911.13173). SGD with momentum 0.9; the learning rate defaults by batch size
(``LEARNING_RATES``). ``val_fraction > 0`` carves a stratified validation split out of the
training split (fixed seed): the curve then tracks validation accuracy (for choosing a
learning rate) and the test split is read once, at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dcgraph.memory import saved_bytes
from dcgraph.nn import DeepControlConv2d

NORMS = ("none", "batchnorm", "groupnorm", "deepcontrol", "deepcontrol_frozen_a")
DEPTHS = ("shallow", "deep")
INITS = ("he", "zero_mean", "zero_mean_he")
LEARNING_RATES = {1: 0.005, 4: 0.02, 32: 0.05}
TARGET_ACCURACY = 0.9


@dataclass
class TrainConfig:
    norm: str = "deepcontrol"
    batch_size: int = 32
    depth: str = "shallow"
    epochs: int = 10
    seed: int = 0
    lr: float | None = None  #: default: LEARNING_RATES by batch size (else 0.05 * sqrt(b / 32))
    evals_per_epoch: int = 4
    #: he | zero_mean (channel-wise zero-mean, unit norm per output channel) | zero_mean_he (norm sqrt 2)
    init: str = "he"
    msr: bool = False  #: subtract each conv filter's gradient mean before every step
    val_fraction: float = 0.0  #: > 0: a validation split from the training split drives the curve

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return LEARNING_RATES.get(self.batch_size, 0.05 * (self.batch_size / 32) ** 0.5)

    def check(self) -> TrainConfig:
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}; expected one of {', '.join(NORMS)}")
        if self.depth not in DEPTHS:
            raise ValueError(f"depth={self.depth!r}; expected one of {', '.join(DEPTHS)}")
        if self.batch_size < 1 or self.epochs < 1 or self.evals_per_epoch < 1:
            raise ValueError("batch_size, epochs and evals_per_epoch must be positive")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}; expected one of {', '.join(INITS)}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction}; expected 0 <= f < 0.5")
        return self


@dataclass
class TrainResult:
    config: dict
    test_accuracy: float
    train_loss: float
    curve: list[tuple[int, float]] = field(default_factory=list)  #: (steps, val or test accuracy)
    epochs_to_target: float | None = None  #: first evaluation reaching TARGET_ACCURACY
    saved_bytes_per_step: int = 0  #: activations autograd keeps for one training step
    seconds: float = 0.0
    val_accuracy: float | None = None  #: final validation accuracy (with val_fraction > 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: digits as ``(N, 1, 8, 8)`` float32, standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.2, random_state=seed,
                                          stratify=digits.target)
    mean, std = xtr.mean(), xtr.std()
    def prep(a):
        return torch.from_numpy((a - mean) / std).unsqueeze(1)
    return prep(xtr), torch.from_numpy(ytr).long(), prep(xte), torch.from_numpy(yte).long()


def split_validation(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int = 0):
    """``(x_train, y_train, x_val, y_val)``: a stratified validation split of a training split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y.numpy())
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    return x[tr], y[tr], x[va], y[va]


def block(norm: str, cin: int, cout: int) -> nn.Module:
    """conv 3x3 (padding 1) -> norm -> relu."""
    if norm.startswith("deepcontrol"):
        return DeepControlConv2d(cin, cout, 3, padding=1, bias=False, act="relu",
                                 learn_a=norm != "deepcontrol_frozen_a")
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
    layers = [conv]
    if norm == "batchnorm":
        layers.append(nn.BatchNorm2d(cout))
    elif norm == "groupnorm":
        layers.append(nn.GroupNorm(4, cout))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build_model(norm: str, depth: str, init: str = "he") -> nn.Module:
    """The network; conv weights get He (Kaiming normal, fan-in, relu) initialisation in every
    variant (PyTorch's default conv init has a gain below He's, under which a 12-layer plain
    stack without variance normalisation, Deep Control included, stays at chance)."""
    if depth == "shallow":
        layers = [block(norm, 1, 16), block(norm, 16, 32), nn.MaxPool2d(2), block(norm, 32, 32)]
        width = 32
    else:
        layers = [block(norm, 1, 16)] + [block(norm, 16, 16) for _ in range(11)]
        width = 16
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, DeepControlConv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if init.startswith("zero_mean"):
        from dcgraph.mean_shift import zero_mean_init_

        zero_mean_init_(model, gain=2.0 ** 0.5 if init == "zero_mean_he" else 1.0)
    return model


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    model.train()
    return (pred == y).float().mean().item()


def train(cfg: TrainConfig, progress: bool = False, data=None) -> TrainResult:
    """Train one configuration; deterministic for a given config (CPU, fixed seeds)."""
    cfg.check()
    xtr, ytr, xte, yte = data if data is not None else load_data()
    xev, yev = xte, yte  # what the curve tracks
    if cfg.val_fraction > 0:
        xtr, ytr, xev, yev = split_validation(xtr, ytr, cfg.val_fraction)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.norm, cfg.depth, cfg.init)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate(), momentum=0.9)
    if cfg.msr:
        from dcgraph.mean_shift import reject_mean_shift

        reject_mean_shift(opt)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(xtr)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    mem = saved_bytes(lambda: F.cross_entropy(model(xtr[:cfg.batch_size]), ytr[:cfg.batch_size]),
                      inputs=[xtr], modules=[model])
    result = TrainResult(asdict(cfg), 0.0, 0.0, saved_bytes_per_step=mem.activations)
    start, step, loss = time.perf_counter(), 0, torch.tensor(0.0)
    model.train()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, disable=not progress, unit="step",
               desc=f"{cfg.norm} b{cfg.batch_size} {cfg.depth} s{cfg.seed}", leave=False)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            if step % eval_every == 0 or step == cfg.epochs * steps_per_epoch:
                acc = evaluate(model, xev, yev)
                result.curve.append((step, acc))
                if result.epochs_to_target is None and acc >= TARGET_ACCURACY:
                    result.epochs_to_target = round(step / steps_per_epoch, 3)
                bar.set_postfix(test_acc=f"{acc:.3f}")
    bar.close()
    if cfg.val_fraction > 0:
        result.val_accuracy = result.curve[-1][1]
        result.test_accuracy = evaluate(model, xte, yte)
    else:
        result.test_accuracy = result.curve[-1][1]
    result.train_loss = float(loss.item()) if torch.isfinite(loss) else float("nan")
    result.seconds = time.perf_counter() - start
    return result
