"""The fused custom op against the reference: property-generated cases, gradients, opcheck."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dcgraph import hoisting, ops
from dcgraph import reference as R
from dcgraph.testing import ACTIVATIONS, CASE_IDS, CASES, ConvCase

TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


@st.composite
def conv_cases(draw, nd: int = 2) -> ConvCase:
    """stride 1-3, padding 0-2, dilation 1-2, kernel 1/3/5/7, groups incl. depthwise, batch 1-4."""
    groups = draw(st.sampled_from([1, 1, 2, 3, "depthwise"]))
    if groups == "depthwise":
        cin = draw(st.integers(1, 6))
        groups, cout = cin, cin * draw(st.sampled_from([1, 2]))
    else:
        cin = groups * draw(st.integers(1, 3))
        cout = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.sampled_from([1, 3, 5, 7])) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    # an input at least as large as the dilated kernel needs, plus 0-6 (odd and tiny maps)
    size = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 6))
                 for k, p, d in zip(kernel, padding, dilation, strict=True))
    return ConvCase("drawn", draw(st.integers(1, 4)), cin, cout, size, kernel, stride, padding,
                    dilation, groups, draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS)))


def _run(fn, case: ConvCase, t: dict, negative_slope: float = 0.1):
    kw = case.conv_kwargs()
    return fn(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"], list(kw["stride"]),
              list(kw["padding"]), list(kw["dilation"]), kw["groups"], case.act, negative_slope)


def _reference(case: ConvCase, t: dict, negative_slope: float = 0.1):
    return R.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"],
                               act=case.act, negative_slope=negative_slope, **case.conv_kwargs())


@given(case=conv_cases(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_op_matches_reference(case, dtype, seed):
    t = case.tensors(dtype, seed)
    torch.testing.assert_close(_run(ops.conv_deep_control_op, case, t), _reference(case, t), **TOL[dtype])


@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_hoisted_and_reduced_forwards_agree(case, seed):
    t = case.tensors(torch.float64, seed)
    torch.testing.assert_close(_run(ops.forward_hoisted, case, t), _run(ops.forward_reduced, case, t),
                               **TOL[torch.float64])


@given(case=st.one_of(conv_cases(1), conv_cases(2), conv_cases(3)), seed=st.integers(0, 2**16))
def test_hoisted_mean_is_the_conv_output_mean(case, seed):
    t = case.tensors(torch.float64, seed)
    kw = case.conv_kwargs()
    y = R.conv(t["x"], t["weight"], None, **kw)
    expected = y.mean(dim=tuple(range(2, y.dim())))
    got = hoisting.hoisted_mean(t["x"], t["weight"], kw["stride"], kw["padding"], kw["dilation"],
                                kw["groups"])
    torch.testing.assert_close(got, expected, **TOL[torch.float64])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shared_cases_forward(case):
    for dtype in (torch.float32, torch.float64):
        t = case.tensors(dtype)
        torch.testing.assert_close(_run(ops.conv_deep_control_op, case, t), _reference(case, t),
                                   **TOL[dtype])


def _gradcheck(case: ConvCase, t: dict, fast: bool = True) -> bool:
    names = ["x", "weight", "bias", "a", "g", "b"]
    inputs = [t[n].requires_grad_() if t[n] is not None else None for n in names]
    kw = case.conv_kwargs()

    def fn(*args):
        return ops.conv_deep_control_op(*args, list(kw["stride"]), list(kw["padding"]),
                                        list(kw["dilation"]), kw["groups"], case.act, 0.1)

    return torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=fast)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_shared_cases(case):
    assert _gradcheck(case, case.tensors(torch.float64))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_every_activation_full(act):
    """Full (not fast-mode) gradcheck on one small strided, grouped, biased case."""
    case = ConvCase("small", 2, 4, 4, (5, 4), (3, 3), (2, 1), (1, 1), (1, 1), 2, True, act)
    assert _gradcheck(case, case.tensors(torch.float64, seed=3), fast=False)


def test_gradcheck_tiny_and_zero_gain():
    """|g| tiny next to |b|: (z - b) / g would lose the signal; the backward recomputes y."""
    case = ConvCase("tiny_g", 2, 3, 4, (5, 5), (3, 3), padding=(1, 1), bias=True, act="relu")
    t = case.tensors(torch.float64)
    t["g"] = torch.tensor([1e-12, 0.0, -0.7, 1.3], dtype=torch.float64)
    t["b"] = torch.tensor([5.0, 0.5, -0.1, 0.0], dtype=torch.float64)
    assert ops._tiny_gain(t["g"], t["b"])
    assert _gradcheck(case, t, fast=False)


def test_gradient_matches_autograd_of_reference_float32():
    """float32 gradients of the custom backward against autograd through the float64 oracle."""
    case = ConvCase("f32", 2, 8, 8, (12, 11), (3, 3), padding=(1, 1), bias=True, act="relu")
    t = case.tensors(torch.float32)
    grad = torch.randn(2, 8, 12, 11)
    names = ["x", "weight", "bias", "a", "g", "b"]
    ours = {n: t[n].clone().requires_grad_() for n in names}
    ref = {n: t[n].double().requires_grad_() for n in names}
    _run(ops.conv_deep_control_op, case, ours).backward(grad)
    _reference(case, ref).backward(grad.double())
    for n in names:
        torch.testing.assert_close(ours[n].grad, ref[n].grad.float(), rtol=1e-4, atol=1e-4, msg=n)


def test_frozen_parameters_get_no_gradient_and_skip_work(monkeypatch):
    """The backward is told which gradients are needed and computes none of the others: with a,
    g, b frozen it returns empty tensors for them (no work), and gradients only for x and W."""
    calls = []
    original = ops.conv_deep_control_backward_op

    def spy(*args):
        grads = original(*args)
        calls.append((list(args[14]), [g.numel() for g in grads]))  # output_mask
        return grads

    monkeypatch.setattr(ops, "conv_deep_control_backward_op", spy)
    case = CASES[0]  # no conv bias
    t = case.tensors(torch.float64)
    x, w = t["x"].requires_grad_(), t["weight"].requires_grad_()
    out = _run(ops.conv_deep_control_op, case, t)
    out.sum().backward()
    ((mask, sizes),) = calls
    assert mask == [True, True, False, False, False, False, False]
    assert sizes[0] == x.numel() and sizes[1] == w.numel() and sizes[2:] == [0, 0, 0, 0, 0]
    assert x.grad is not None and w.grad is not None
    # and with a learning, its gradient is computed (and only then)
    calls.clear()
    t = case.tensors(torch.float64)
    a = t["a"].requires_grad_()
    _run(ops.conv_deep_control_op, case, t).sum().backward()
    ((mask, sizes),) = calls
    assert mask == [False, False, False, True, False, False, False] and sizes[3] == a.numel()
    assert a.grad is not None and bool(torch.isfinite(a.grad).all())


def test_saves_only_input_and_output():
    """The custom autograd keeps x and out (plus parameters); silu keeps x only."""
    from dcgraph.memory import saved_bytes

    for act, expected_outputs in (("relu", 1), ("silu", 0)):
        case = ConvCase("mem", 2, 4, 8, (6, 6), (3, 3), padding=(1, 1), act=act)
        t = case.tensors()
        for n in ("x", "weight", "a", "g", "b"):
            t[n].requires_grad_()
        holder = {}

        def fwd(t=t, holder=holder, case=case):
            holder["out"] = _run(ops.conv_deep_control_op, case, t)

        mem = saved_bytes(fwd, inputs=[t["x"]])
        out_bytes = holder["out"].numel() * 4
        assert mem.inputs == t["x"].numel() * 4
        params = sum(t[n].numel() * 4 for n in ("weight", "a", "g", "b"))
        assert mem.activations == expected_outputs * out_bytes + params


def test_batch_independence():
    """A sample's output and input gradient do not depend on the other samples."""
    case = ConvCase("bi", 4, 3, 5, (7, 7), (3, 3), padding=(1, 1), bias=True, act="silu")
    t = case.tensors(torch.float64)
    x = t["x"].clone().requires_grad_()
    out = _run(ops.conv_deep_control_op, case, {**t, "x": x})
    out[0].sum().backward()
    changed = t["x"].clone()
    changed[1:] = torch.randn_like(changed[1:]) * 10
    x2 = changed.requires_grad_()
    out2 = _run(ops.conv_deep_control_op, case, {**t, "x": x2})
    out2[0].sum().backward()
    torch.testing.assert_close(out[0], out2[0], rtol=0, atol=0)
    torch.testing.assert_close(x.grad[0], x2.grad[0], rtol=0, atol=0)
    assert x.grad[1:].abs().max() == 0
    single = _run(ops.conv_deep_control_op, case, {**t, "x": t["x"][:1]})
    torch.testing.assert_close(single[0], out[0].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(act, bias):
    case = ConvCase("oc", 2, 4, 6, (6, 5), (3, 3), (2, 1), (1, 1), (1, 2), 2, bias, act)
    t = case.tensors()
    for v in t.values():
        if v is not None:
            v.requires_grad_()
    kw = case.conv_kwargs()
    args = (t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"], list(kw["stride"]),
            list(kw["padding"]), list(kw["dilation"]), kw["groups"], act, 0.1)
    torch.library.opcheck(ops.conv_deep_control_op, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out = ops.conv_deep_control_op(*detached)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops.conv_deep_control_backward_op,
                          (grad, detached[0], out, *detached[1:], [True] * 6))


@pytest.mark.parametrize(("bad", "message"), [
    ({"act": "gelu"}, "unknown activation"),
    ({"x": torch.randn(2, 4)}, "1-3 spatial dims"),
    ({"weight": torch.randn(6, 4, 3)}, "does not match input"),
])
def test_bad_input_is_a_clear_error(bad, message):
    case = CASES[0]
    t = {**case.tensors(), **{k: v for k, v in bad.items() if k != "act"}}
    act = bad.get("act", case.act)
    kw = case.conv_kwargs()
    with pytest.raises(ValueError, match=message):
        ops.conv_deep_control_op(t["x"], t["weight"], None, t["a"], t["g"], t["b"],
                                 list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]),
                                 1, act, 0.1)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eager_function_path_equals_op_path(case):
    """functional.conv_deep_control trains through ops.ConvDeepControlFunction in plain eager
    mode; it must give what the registered op's autograd gives: the output bit for bit, the
    gradients to float64 rounding (the eager path keeps the forward's map means for ``da``, the
    op's path recomputes them by hoisting)."""
    from dcgraph import functional as DF

    names = ["x", "weight", "bias", "a", "g", "b"]
    t = case.tensors(torch.float64)
    runs = []
    for use_op in (True, False):
        leaves = {n: (t[n].clone().requires_grad_() if t[n] is not None else None) for n in names}
        args = [leaves[n] for n in names]
        kw = case.conv_kwargs()
        if use_op:
            out = _run(ops.conv_deep_control_op, case, leaves)
        else:
            out = DF.conv_deep_control(*args, kw["stride"], kw["padding"], kw["dilation"],
                                       kw["groups"], case.act, 0.1)
            assert out.grad_fn.name() == "ConvDeepControlFunctionBackward"
        out.backward(torch.ones_like(out))
        runs.append((out.detach(), [leaves[n].grad for n in names if leaves[n] is not None]))
    (o1, g1), (o2, g2) = runs
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_the_module():
    import dcgraph

    m = dcgraph.DeepControlConv2d(3, 4, 3, stride=2, padding=1, act="silu", dtype=torch.float64)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, a, g, b: dcgraph.conv_deep_control(
        x, w, m.bias, a, g, b, 2, 1, act="silu"), (x, m.weight, m.a, m.g, m.b))


def test_tracers_see_the_op_in_training():
    import dcgraph

    m = dcgraph.DeepControlConv2d(3, 4, 3, act="relu")
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: m(x))(torch.randn(2, 3, 6, 6))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.dcgraph.conv_deep_control.default in targets
