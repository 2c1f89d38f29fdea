"""Whole models through every TVM route with the mean path live, and the guard that keeps it so.

A BatchNorm model converted with the exact ``preserve`` init has ``a = 0`` in every block: the
per-sample mean term drops out, and a fused kernel whose mean is wrong (a hoisted shift that
ignores the stride, an epilogue that ignores ``a``) still matches. Here every model is
:func:`dcgraph.testing.live_mean` (``a`` drawn from [0.5, 1.5) after conversion) and the
reference is that eager model (Deep Control as plain ops), on each route: torch and ONNX import
on x86, the emulated ARM device (a tuned build: ``test_tune.py``, with its database). Then the
*same* check with each kernel mutation applied must fail on each route: if a future kernel
rewrite breaks the mean, these tests see it.
"""

from __future__ import annotations

import pytest
import torch

tvm = pytest.importorskip("tvm")

from dcgraph import zoo  # noqa: E402
from dcgraph.backends import tvm as dtvm  # noqa: E402
from dcgraph.testing import live_mean, relative_error  # noqa: E402
from tests.backends.tvm_cases import MUTATIONS, apply_mutation, ignore_a_two_pass  # noqa: E402

RTOL = 1e-4  # float32 TVM vs the float32 eager model, relative to the output's scale
ROUTES = ("torch", "onnx", "arm")  # the tuned route: tests/backends/test_tune.py (its database)


@pytest.fixture(scope="module")
def resnet():
    """ResNet-18-like (its stride-2 convs and 1x1 downsamples), width 8, 32 px, mean path live."""
    model = live_mean(zoo.randomize_norm_stats(zoo.resnet18_like(width=8)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    return model, x, want


def _compiled_output(route: str, model, x: torch.Tensor, request) -> torch.Tensor:
    """The model's output through one route."""
    if route == "onnx":
        from dcgraph.onnx_export import export_onnx

        return dtvm.compile(export_onnx(model, x[:1]), "x86", x)(x)
    if route == "arm":
        remote = request.getfixturevalue("arm_remote")
        return dtvm.compile(model, "arm", x).remote(remote)(x)
    return dtvm.compile(model, "x86", x)(x)


def test_the_mean_is_live(resnet):
    """The check below can fail: with a = 0 (what preserve gives) the model computes something else."""
    model, x, want = resnet
    a_values = [m.a for m in model.modules() if isinstance(getattr(m, "a", None), torch.nn.Parameter)]
    assert len(a_values) == 20 and all(bool((a >= 0.5).all()) for a in a_values)
    saved = [a.detach().clone() for a in a_values]
    try:
        with torch.no_grad():
            for a in a_values:
                a.zero_()
            without = model(x)
    finally:
        with torch.no_grad():
            for a, v in zip(a_values, saved, strict=True):
                a.copy_(v)
    assert relative_error(without, want) > 1e-2


@pytest.mark.parametrize("route", ROUTES)
def test_whole_model_matches_the_eager_model(resnet, route, request):
    model, x, want = resnet
    assert relative_error(_compiled_output(route, model, x, request), want) <= RTOL


# the ONNX route's mutations run with the slow tests (make test-slow): it lowers through the same
# kernels as the torch route, whose mutations run here, and its own conversion is checked above
MUTATION_ROUTES = [pytest.param(r, marks=pytest.mark.slow) if r == "onnx" else r for r in ROUTES]


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@pytest.mark.parametrize("route", MUTATION_ROUTES)
def test_a_broken_mean_fails_the_whole_model_check(resnet, route, mutation, request, monkeypatch):
    model, x, want = resnet
    apply_mutation(monkeypatch, mutation)
    err = relative_error(_compiled_output(route, model, x, request), want)
    assert not err <= RTOL, f"{mutation} on the {route} route passed the whole-model check ({err:.1e})"


def test_depthwise_two_pass_model_matches_and_its_mutation_fails(monkeypatch):
    """MobileNetV2-like: depthwise convs lower two-pass (plan auto), the others hoisted."""
    model = live_mean(zoo.randomize_norm_stats(zoo.mobilenet_v2_like(width=8)))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    compiled = dtvm.compile(model, "x86", x)
    assert any("dc_two_pass" in k.name for k in compiled.kernels)
    assert relative_error(compiled(x), want) <= RTOL
    apply_mutation(monkeypatch, {"deep_control": ignore_a_two_pass})
    assert not relative_error(dtvm.compile(model, "x86", x)(x), want) <= RTOL
