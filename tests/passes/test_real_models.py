"""The passes on model definitions nobody here wrote (pytorchcv, geffnet, efficientnet_pytorch).

Each model gets non-trivial BatchNorm statistics, is rewritten, and is compared with the
original in float64, where a wrong rewrite cannot hide behind float32 rounding (which through
these deep random-weight nets reaches 1e-5..1e-4 on its own). The expected counts are the
number of BatchNorm layers that directly follow a convolution, read off each architecture;
pre-activation BatchNorms (DenseNet, PreResNet) and BatchNorms after a concatenation of
convolutions (MixNet's mixed depthwise conv) are left alone and reported.
"""

import importlib

import pytest
import torch

from dcgraph import zoo
from dcgraph.passes import verify
from dcgraph.passes.export import rewrite_exported
from dcgraph.passes.fx import TraceFailure, rewrite

pytest.importorskip("pytorchcv")

# (module:function, conv+BN pairs, BNs left alone)
PYTORCHCV = [
    ("resnet:resnet18", 20, 0),
    ("mobilenetv2:mobilenetv2_w1", 53, 0),
    ("mobilenetv3:mobilenetv3_large_w1", 46, 0),
    ("efficientnet:efficientnet_b0", 49, 0),
    ("regnet:regnetx002", 44, 0),
    ("shufflenetv2:shufflenetv2_w1", 56, 0),
    ("ghostnet:ghostnet", 81, 0),
    ("seresnet:seresnet18", 20, 0),
    ("preresnet:preresnet18", 9, 9),
]
SLOW = [("densenet:densenet121", 59, 62), ("resnext:resnext50_32x4d", 53, 0),
        ("darknet53:darknet53", 52, 0)]


def _pytorchcv(spec):
    module, fn = spec.split(":")
    return getattr(importlib.import_module(f"pytorchcv.models.{module}"), fn)()


def _check(model, pairs, left_alone, route="fx", size=224):
    model = zoo.randomize_norm_stats(model).eval().double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    if route == "fx":
        rewritten, report = rewrite(model)
    else:
        ep = torch.export.export(model, (x,))
        new_ep, report = rewrite_exported(ep)
        rewritten = new_ep.module()
    counts = dict(report.counts)
    tails = counts.pop("fused+residual->fused", 0)  # residual tails (tests/passes/test_residual.py)
    assert counts == {"conv+batchnorm->deep_control": pairs, "conv+deep_control->fused": pairs}
    assert tails <= pairs
    assert len(report.skips) == left_alone
    assert all(s.reason == "batchnorm does not follow a convolution" for s in report.skips)
    assert verify(model, rewritten, [x], rtol=1e-10) <= 1e-10


@pytest.mark.parametrize(("spec", "pairs", "left_alone"), PYTORCHCV, ids=[s for s, *_ in PYTORCHCV])
def test_pytorchcv(spec, pairs, left_alone):
    _check(_pytorchcv(spec), pairs, left_alone)


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "pairs", "left_alone"), SLOW, ids=[s for s, *_ in SLOW])
def test_pytorchcv_large(spec, pairs, left_alone):
    _check(_pytorchcv(spec), pairs, left_alone)


def test_efficientnet_pytorch_both_routes():
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    model = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0")
    # its memory-efficient swish is a custom autograd.Function: fx traces the plain one,
    # torch.export traces either
    _check(model, 49, 0, route="export")
    model.set_swish(memory_efficient=False)
    _check(model, 49, 0, route="fx")


def test_geffnet_where_fx_cannot_trace():
    geffnet = pytest.importorskip("geffnet")
    model = geffnet.create_model("tf_efficientnet_b0")  # data-dependent "same" padding
    with pytest.raises(TraceFailure, match="rewrite_exported"):
        rewrite(model)
    _check(model, 49, 0, route="export")


def test_geffnet_mixnet_concatenated_convs_left_alone():
    geffnet = pytest.importorskip("geffnet")
    _check(geffnet.create_model("mixnet_s"), 15, 34)
