"""The residual tail ``act(DC(conv(x)) + skip)`` (spec section 4a) against the reference:
forward and every gradient, both autograd paths, the backward's three ways to get ``dg``, and
the saved bytes of a stack of ResNet basic blocks rewritten by the passes."""

import warnings

import pytest
import torch
from torch import nn

from dcgraph import functional as DF
from dcgraph import ops, zoo
from dcgraph import reference as R
from dcgraph.memory import saved_bytes
from dcgraph.passes.fx import rewrite
from dcgraph.testing import CASE_IDS, CASES, ConvCase

NAMES = ["x", "weight", "bias", "a", "g", "b", "skip"]
TOL64 = {"rtol": 1e-9, "atol": 1e-9}


def _skip_for(case: ConvCase, t: dict, shape: str = "full", seed: int = 1) -> torch.Tensor:
    kw = case.conv_kwargs()
    y = R.conv(t["x"], t["weight"], t["bias"], **kw)
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    return full if shape == "full" else full[:1, :, :1].contiguous()  # (1, C, 1, ...) broadcast


def _grads(fn, case: ConvCase, t: dict, grad_seed: int = 2):
    """Output and gradients of every tensor input (None where there is none)."""
    leaves = {n: (t[n].detach().clone().requires_grad_() if t[n] is not None else None) for n in NAMES}
    out = fn(leaves)
    gen = torch.Generator().manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
    return out.detach(), {n: (v.grad if v is not None else None) for n, v in leaves.items()}


def _op(case: ConvCase):
    kw = case.conv_kwargs()
    return lambda v: ops.conv_deep_control_op(
        v["x"], v["weight"], v["bias"], v["a"], v["g"], v["b"], list(kw["stride"]), list(kw["padding"]),
        list(kw["dilation"]), kw["groups"], case.act, 0.1, v["skip"])


def _eager(case: ConvCase):
    kw = case.conv_kwargs()
    return lambda v: DF.conv_deep_control(
        v["x"], v["weight"], v["bias"], v["a"], v["g"], v["b"], kw["stride"], kw["padding"],
        kw["dilation"], kw["groups"], case.act, 0.1, skip=v["skip"])


def _ref(case: ConvCase):
    return lambda v: R.conv_deep_control(v["x"], v["weight"], v["bias"], v["a"], v["g"], v["b"],
                                         act=case.act, negative_slope=0.1, skip=v["skip"],
                                         **case.conv_kwargs())


def _assert_matches_reference(case: ConvCase, t: dict) -> None:
    ref_out, ref = _grads(_ref(case), case, t)
    for path in (_op, _eager):
        out, got = _grads(path(case), case, t)
        torch.testing.assert_close(out, ref_out, **TOL64)
        for n in NAMES:
            if ref[n] is not None:
                torch.testing.assert_close(got[n], ref[n], **TOL64, msg=f"{path.__name__} d{n}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tail_matches_reference_output_and_every_gradient(case):
    """Both autograd paths (the registered op, the eager Function), float64, every shared case."""
    t = case.tensors(torch.float64)
    t["skip"] = _skip_for(case, t)
    _assert_matches_reference(case, t)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[9]], ids=lambda c: c.name)
def test_broadcast_residual_gradient_is_summed(case):
    t = case.tensors(torch.float64)
    t["skip"] = _skip_for(case, t, shape="broadcast")
    _assert_matches_reference(case, t)


def test_deep_layer_shape_sums_dg_over_the_output():
    """Output smaller than the weights (a ResNet layer4 shape, scaled down): the eager path keeps
    the residual and sums ``dg`` over the output instead of ``<W, dW>``; same gradients."""
    for act in ("relu", "relu6", "leaky_relu", "identity"):
        case = ConvCase("deep", 2, 32, 48, (3, 3), (3, 3), padding=(1, 1), act=act, bias=True)
        t = case.tensors(torch.float64)
        assert t["weight"].numel() > 2 * 48 * 9  # the case is what the test says
        t["skip"] = _skip_for(case, t)
        _assert_matches_reference(case, t)
        t["skip"] = None
        _assert_matches_reference(case, t)


def test_tiny_gain_recomputes_and_stays_exact():
    """A channel with g = 0: ``<W, dW> / g`` is 0 / 0 there; the backward recomputes the raw
    output and sums ``dz * u`` instead."""
    case = ConvCase("tiny", 2, 3, 4, (6, 6), (3, 3), padding=(1, 1), act="relu")
    t = case.tensors(torch.float64)
    t["g"][1] = 0.0
    t["skip"] = _skip_for(case, t)
    assert ops._tiny_gain(t["g"], t["b"])
    _assert_matches_reference(case, t)


def test_gradcheck_with_residual():
    case = ConvCase("gc", 2, 2, 3, (5, 5), (3, 3), padding=(1, 1), act="leaky_relu", bias=True)
    t = case.tensors(torch.float64)
    t["skip"] = _skip_for(case, t)
    kw = case.conv_kwargs()
    args = [t[n].clone().requires_grad_() for n in NAMES]

    def f(x, w, c0, a, g, b, skip):
        return ops.conv_deep_control_op(x, w, c0, a, g, b, list(kw["stride"]), list(kw["padding"]),
                                        list(kw["dilation"]), kw["groups"], case.act, 0.1, skip)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_residual_that_does_not_broadcast_is_refused():
    case = CASES[0]
    t = case.tensors()
    kw = case.conv_kwargs()
    bad = torch.randn(2, 6, 9, 9)
    with pytest.raises(ValueError, match="does not broadcast to the block output"):
        DF.conv_deep_control(t["x"], t["weight"], None, t["a"], t["g"], t["b"], kw["stride"],
                             kw["padding"], act="relu", skip=bad)


def _resnet_stack(depth: int, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[zoo.BasicBlock(width, width) for _ in range(depth)])


def _marginal_bytes(variant: str, x: torch.Tensor) -> int:
    """Saved activation bytes of 8 basic blocks minus those of 4: what 4 more blocks cost."""
    sizes = []
    for depth in (4, 8):
        model = _resnet_stack(depth).train()
        if variant != "batchnorm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, _ = rewrite(model, init="fresh", fuse_blocks=True,
                                   residual=variant == "fused_tail")
            model.train()
        sizes.append(saved_bytes(lambda m=model: m(x), inputs=[x], modules=[model]).activations)
    return sizes[1] - sizes[0]


def test_basic_blocks_rewritten_keep_half_of_batchnorm():
    """torchvision's BasicBlock (``zoo.BasicBlock``), rewritten by the passes, training mode:
    two tensors per block (the two conv outputs) where BatchNorm keeps four. With the tail
    inside the op they are the op's outputs; without it, the second op (activation identity)
    keeps nothing of its own and the relu after the add keeps the sum, the next block's input."""
    x = torch.randn(2, 32, 12, 12, requires_grad=True)
    per_tensor = x.numel() * 4
    bn = _marginal_bytes("batchnorm", x)
    tail = _marginal_bytes("fused_tail", x)
    no_tail = _marginal_bytes("fused", x)
    means = 4 * 2 * (2 * 32 * 4)  # 4 blocks x 2 ops x the (N, C) map means
    assert bn >= 4 * 4 * per_tensor
    assert tail == 4 * 2 * per_tensor + means
    assert tail - means <= 0.5 * bn
    assert no_tail == tail
