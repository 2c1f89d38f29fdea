"""``torch.compile(model, backend="dcgraph")``: outputs against eager, what runs on TVM and what
falls back (counted by ``dcgraph.backends.torch_compile.counters``), and no rebuild on a repeat call.

The backend is looked up by name, through the entry point in ``pyproject.toml``: nothing imports
``dcgraph.backends.torch_compile`` before ``torch.compile`` does. Tolerances: float32 TVM against
the float32 eager model, relative to the output's scale (``RTOL``, as in ``test_whole_models``).
"""

from __future__ import annotations

import copy
import importlib
import logging

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from dcgraph import zoo
from dcgraph.testing import live_mean, relative_error

RTOL = 1e-4
STRICT = {"fallback": "error"}  # a graph that cannot be built fails the test instead of running eagerly


@pytest.fixture
def counters():
    """The backend's counters, reset, with Dynamo's caches cleared."""
    torch._dynamo.reset()
    from dcgraph.backends.torch_compile import counters

    counters.clear()
    yield counters
    torch._dynamo.reset()


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, x: torch.Tensor, options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch.compile's output, eager's output) under no_grad."""
    compiled = torch.compile(model, backend="dcgraph", options=options)
    with torch.no_grad():
        want = copy.deepcopy(model)(x)
        return compiled(x), want


@pytest.mark.parametrize("name", ["resnet18_like", "mobilenet_v2_like", "efficientnet_like"])
def test_batchnorm_model_is_converted_and_matches_eager(name, counters):
    model = zoo.randomize_norm_stats(getattr(zoo, name)(width=8)).eval()
    pairs = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = _x(2, 3, 32, 32)
    got, want = _run(model, x, STRICT)
    assert relative_error(got, want) <= RTOL
    assert counters["compiled"] == 1 and counters["fallback"] == 0
    assert counters["converted"] == pairs and counters["fused"] == pairs
    compiled = torch.compile(model, backend="dcgraph", options=STRICT)
    with torch.no_grad():
        compiled(x)
        builds = counters["builds"]
        compiled(x)
    assert counters["builds"] == builds, "a repeat call with the same shape rebuilt"


def test_deep_control_model_with_the_mean_live(counters):
    """A model that already has Deep Control (``convert=False``), ``a`` non-zero in every block."""
    model = live_mean(zoo.randomize_norm_stats(zoo.resnet18_like(width=8))).eval()
    got, want = _run(model, _x(1, 3, 32, 32), {**STRICT, "convert": False})
    assert relative_error(got, want) <= RTOL
    assert counters["compiled"] == 1 and counters["converted"] == 0


def test_a_real_architecture(counters):
    """pytorchcv's MobileNetV2 (a definition nobody here wrote), 224 px (its final pool is 7x7)."""
    pytest.importorskip("pytorchcv")
    model = importlib.import_module("pytorchcv.models.mobilenetv2").mobilenetv2_w1()
    model = zoo.randomize_norm_stats(model).eval()
    got, want = _run(model, _x(1, 3, 224, 224), STRICT)
    assert relative_error(got, want) <= RTOL
    assert counters["converted"] == 53 and counters["fallback"] == 0


class _Broken(nn.Module):
    """Two conv blocks with a graph break between them and an op TVM cannot import at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.a = zoo.conv_block("batchnorm", 3, 8)
        self.b = zoo.conv_block("batchnorm", 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        torch._dynamo.graph_break()
        x = self.b(x)
        torch._dynamo.graph_break()
        return torch.logcumsumexp(x.flatten(1), 1)


def test_graph_breaks_and_an_unsupported_graph_fall_back(counters, caplog):
    model = zoo.randomize_norm_stats(_Broken()).eval()
    with caplog.at_level(logging.WARNING, logger="dcgraph.torch_compile"):
        got, want = _run(model, _x(1, 3, 16, 16))
    assert relative_error(got, want) <= RTOL
    assert counters["graphs"] == 3 and counters["compiled"] == 2 and counters["fallback"] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dcgraph.torch_compile"]
    assert len(lines) == 1 and "runs eagerly" in lines[0] and "logcumsumexp" in lines[0]


def test_strict_mode_raises_instead(counters):
    compiled = torch.compile(lambda x: torch.logcumsumexp(x, 1), backend="dcgraph", options=STRICT)
    with torch.no_grad(), pytest.raises(Exception, match="logcumsumexp"):
        compiled(_x(2, 5))


def test_grad_mode_runs_eagerly_and_backward_works(counters, caplog):
    model = zoo.randomize_norm_stats(zoo.conv_block("batchnorm", 3, 8)).eval()
    compiled = torch.compile(model, backend="dcgraph")
    x = _x(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="dcgraph.torch_compile"):
        y = compiled(x)
    y.sum().backward()
    assert model[0].weight.grad is not None and counters["eager_calls"] == 1 and counters["builds"] == 0
    assert any("needs gradients" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        got = compiled(x)
    assert counters["builds"] == 1 and relative_error(got, model(x).detach()) <= RTOL


def test_batchnorm_in_training_mode_runs_eagerly(counters):
    """Training-mode BatchNorm updates its running statistics: the graph must run as traced."""
    model = zoo.conv_block("batchnorm", 3, 8).train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="dcgraph")
    x = _x(2, 3, 8, 8)
    with torch.no_grad():
        got, want = compiled(x), twin(x)
    assert counters["fallback"] == 1
    assert relative_error(got, want) <= RTOL
    assert torch.allclose(model[1].running_mean, twin[1].running_mean)


def test_a_changed_weight_rebuilds(counters):
    model = zoo.randomize_norm_stats(zoo.conv_block("batchnorm", 3, 8)).eval()
    compiled = torch.compile(model, backend="dcgraph", options=STRICT)
    x = _x(1, 3, 8, 8)
    with torch.no_grad():
        compiled(x)
        model[0].weight.mul_(2.0)  # what an optimizer step or load_state_dict does
        got = compiled(x)
        want = model(x)
    assert counters["rebuilds"] == 1 and relative_error(got, want) <= RTOL


def test_new_batch_sizes_are_built_once_each(counters):
    model = zoo.randomize_norm_stats(zoo.resnet18_like(width=8)).eval()
    compiled = torch.compile(model, backend="dcgraph", options=STRICT)
    with torch.no_grad():
        for batch in (1, 3, 8, 3):
            x = _x(batch, 3, 32, 32, seed=batch)
            assert relative_error(compiled(x), model(x)) <= RTOL, f"batch {batch}"
    # batch 1 static; then Dynamo's automatic dynamic graph, built once for 3 and once for 8
    assert counters["builds"] == 3 and counters["graphs"] == 2


@pytest.mark.slow  # one build per batch bucket: ~50 s
def test_max_batch_builds_once_for_every_batch_size(counters):
    """A batch marked dynamic hands over one symbolic-batch graph; with ``max_batch`` it is built
    once, with buckets, and batches 3, 8, 5 and 2 all run on that build. (Batch 1 is a graph of its
    own: Dynamo specialises sizes 0 and 1; that static graph gets a plain build.)"""
    model = zoo.randomize_norm_stats(zoo.resnet18_like(width=8)).eval()
    compiled = torch.compile(model, backend="dcgraph", options={**STRICT, "max_batch": 8})
    with torch.no_grad():
        for batch in (3, 8, 5, 2, 1):
            x = _x(batch, 3, 32, 32, seed=batch)
            if batch == 3:
                torch._dynamo.mark_dynamic(x, 0)
            assert relative_error(compiled(x), model(x)) <= RTOL, f"batch {batch}"
            assert counters["builds"] == (1 if batch > 1 else 2), batch
    assert counters["graphs"] == 2


def test_a_wrong_option_is_one_clear_error(counters):
    compiled = torch.compile(nn.ReLU(), backend="dcgraph", options={"taget": "x86"})
    with torch.no_grad(), pytest.raises(Exception, match=r"unknown option.*taget"):
        compiled(_x(2, 3))
