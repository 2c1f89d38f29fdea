"""``dcgraph.compare``: the one comparison every check goes through. NaN, infinity, a shape or an
output-count mismatch can never pass a tolerance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcgraph.compare import leaves, relative_error, worst_error


def test_relative_error_is_scale_free():
    want = np.array([1.0, -2.0, 4.0])
    assert relative_error(want, want) == 0.0
    assert relative_error(want + 0.04, want) == pytest.approx(0.01)
    assert relative_error(torch.tensor(want * 1e6 + 4e4), torch.tensor(want * 1e6)) == pytest.approx(0.01)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_failures_on_either_side(bad):
    want = np.ones((2, 3))
    got = want.copy()
    got[1, 2] = bad
    assert relative_error(got, want) == math.inf
    assert relative_error(want, got) == math.inf
    assert not relative_error(np.full((2, 3), math.nan), want) <= 1e-4  # all-NaN: never "verified"


def test_shape_mismatch_is_a_failure():
    assert relative_error(np.ones((2, 3)), np.ones((3, 2))) == math.inf
    assert relative_error(np.ones((1, 3)), np.ones(3)) == math.inf  # no broadcasting


def test_every_output_of_a_tuple_is_compared():
    a, b = torch.ones(2), torch.full((3,), 2.0)
    assert worst_error((a, b), (a, b)) == (0.0, "output 0")
    err, where = worst_error((a, b * 1.1), (a, b))
    assert err == pytest.approx(0.1) and where == "output 1"
    err, where = worst_error((a, torch.full((3,), math.nan)), (a, b))
    assert err == math.inf and where == "output 1"
    assert worst_error((a,), (a, b))[0] == math.inf
    assert worst_error({"x": [a, (b,)]}, [a, b])[0] == 0.0 and len(leaves({"x": [a, (b,)]})) == 2


def test_onnx_compare_fails_an_all_nan_model():
    """``dcgraph onnx convert --verify`` compares with this: a NaN output must not pass."""
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from dcgraph.onnx_tools import compare

    def model(scale: float):
        w = nh.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
        s = nh.from_array(np.array(scale, np.float32), "S")
        nodes = [h.make_node("Conv", ["x", "W"], ["y"]), h.make_node("Mul", ["y", "S"], ["out"])]
        graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                             [h.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 6, 6])], [w, s])
        return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10)

    assert compare(model(1.0), model(1.0)) == 0.0
    assert compare(model(1.0), model(math.nan)) == math.inf
    assert compare(model(math.nan), model(1.0)) == math.inf
