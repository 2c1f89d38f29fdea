"""FusePlainDeepControl: Deep Control written as plain Relax ops after a conv, from torch.export and
from ONNX, replaced by dcgraph's kernels. Counts per algebraic form and activation, numerics
against the unfused module and the torch model, a Before/Expected check, and the graphs it
must leave alone.

Tolerances: float32, ``rtol = atol = 1e-4`` (the fused kernels sum in a different order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from dcgraph.backends.tvm import fuse_plain as FP  # noqa: E402
from dcgraph.backends.tvm import lowering  # noqa: E402
from dcgraph.backends.tvm.lowering import KERNEL_ATTR, emit_conv_deep_control  # noqa: E402
from dcgraph.backends.tvm.pipeline import relax_pipeline  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
TOL = {"rtol": 1e-4, "atol": 1e-4}

#: z of each algebraic form (m = mean over the spatial dims with keepdim, a/g/b per channel)
FORMS = {
    "y_minus_ma": lambda y, m, a, g, b: (y - m * a) * g + b,
    "y_minus_am": lambda y, m, a, g, b: (y - a * m) * g + b,
    "g_first": lambda y, m, a, g, b: g * (y - a * m) + b,
    "folded": lambda y, m, a, g, b: y * g - m * (a * g) + b,
}
ACTS = {
    "identity": lambda z: z, "relu": F.relu, "relu6": F.relu6, "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "hardswish": F.hardswish, "silu": F.silu, "silu_by_hand": lambda z: z * torch.sigmoid(z),
}


class PlainDC(nn.Module):
    """One ``conv -> plain Deep Control -> act`` branch per activation, side by side on one input."""

    def __init__(self, form: str, acts: list[str], nd: int = 2, c: int = 4, bias: bool = True,
                 vec: str = "c11", seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        self.convs = nn.ModuleList(conv(3, c, 3, padding=1, bias=bias) for _ in acts)
        shape = {"c11": (c,) + (1,) * nd, "1c11": (1, c) + (1,) * nd, "c": (c,)}[vec]
        for i in range(len(acts)):
            self.register_buffer(f"a{i}", (0.5 + torch.rand(c, generator=gen)).reshape(shape))
            self.register_buffer(f"g{i}", (0.5 + torch.rand(c, generator=gen)).reshape(shape))
            self.register_buffer(f"b{i}", torch.randn(c, generator=gen).reshape(shape))
        self.form, self.acts, self.nd = form, acts, nd

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i, (conv, act) in enumerate(zip(self.convs, self.acts, strict=True)):
            y = conv(x)
            m = y.mean(tuple(range(2, 2 + self.nd)), keepdim=True)
            z = FORMS[self.form](y, m, getattr(self, f"a{i}"), getattr(self, f"g{i}"), getattr(self, f"b{i}"))
            outs.append(ACTS[act](z))
        return tuple(outs)


def _import(model: nn.Module, x: torch.Tensor) -> tvm.IRModule:
    return from_exported_program(torch.export.export(model.eval(), (x,)))


def _run(mod: tvm.IRModule, x: np.ndarray) -> list[np.ndarray]:
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=relax_pipeline(TARGET))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x, tvm.cpu()))
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def _ops(mod: tvm.IRModule) -> list[str]:
    """Relax ops and dcgraph kernels called by ``main``."""
    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op):
                names.append(call.op.name)
                if call.op.name == "relax.call_tir" and KERNEL_ATTR in (mod[call.args[0]].attrs or {}):
                    names[-1] = str(mod[call.args[0]].attrs[KERNEL_ATTR])
    return names


def _torch(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_and_activation_fuses_and_matches(form):
    acts = list(ACTS)
    model, x = PlainDC(form, acts), _x(2, 3, 8, 8)
    mod = _import(model, x)
    found = FP.find_plain_deep_control(relax.transform.FoldConstant()(mod)["main"])
    expected_act = {"silu_by_hand": "silu"}
    assert sorted(m.act for m in found) == sorted(expected_act.get(a, a) for a in acts)
    assert {m.form for m in found} == {"folded" if form == "folded" else "scaled"}
    fused, count = FP.fuse_plain_deep_control(mod)
    assert count == len(acts)
    ops = _ops(fused)
    assert ops.count("dc_shift") == ops.count("dc_conv") == len(acts)
    assert not {"relax.mean", "relax.nn.conv2d", "relax.sigmoid", "relax.clip"} & set(ops)
    for g, t in zip(_run(fused, x.numpy()), _torch(model, x), strict=True):
        np.testing.assert_allclose(g, t, **TOL)


@pytest.mark.parametrize(("nd", "vec", "bias"), [(1, "1c11", False), (3, "c11", True)], ids=["1d", "3d"])
def test_1d_and_3d_convs(nd, vec, bias):
    model = PlainDC("g_first", ["relu", "hardswish"], nd=nd, vec=vec, bias=bias)
    x = _x(2, 3, *([9] if nd == 1 else [4, 5, 5]))
    with lowering.options(plan="two_pass" if nd == 3 else "hoisted"):
        fused, count = FP.fuse_plain_deep_control(_import(model, x))
    assert count == 2
    for g, t in zip(_run(fused, x.numpy()), _torch(model, x), strict=True):
        np.testing.assert_allclose(g, t, **TOL)


def test_dcgraph_plain_blocks_through_torch_and_onnx():
    """The zoo's ``plain`` DCNet (DeepControl2d: y*g + reshape(b - a*g*mean(y)), no keepdim)."""
    from dcgraph import zoo
    from dcgraph.backends.tvm.frontends.from_onnx import from_onnx
    from dcgraph.onnx_export import export_onnx

    model = zoo.dcnet("plain", act="hardswish", widths=(8, 16), per_stage=1).eval()
    gen = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if name.endswith((".a", ".g", ".b")):
            p.data = (0.5 + torch.rand(p.shape, generator=gen)) if not name.endswith(".b") else torch.randn(
                p.shape, generator=gen)
    x = _x(2, 3, 16, 16)
    expected = _torch(model, x)[0]
    via_onnx = from_onnx(export_onnx(model, x[:1]))  # dynamic batch
    for mod in (_import(model, x), via_onnx):
        found = FP.find_plain_deep_control(relax.transform.FoldConstant()(mod)["main"])
        assert [(m.act, m.form) for m in found] == [("hardswish", "shifted")] * 2
        fused, count = FP.fuse_plain_deep_control(mod)
        assert count == 2 and _ops(fused).count("dc_conv") == 2
        assert _ops(fused).count("relax.mean") == 1  # the classifier's pool only
        np.testing.assert_allclose(_run(fused, x.numpy())[0], expected, **TOL)


def test_module_pass_counts_and_composes():
    model, x = PlainDC("y_minus_am", ["relu", "silu"]), _x(1, 3, 6, 6)
    mod = _import(model, x)
    fuse = FP.FusePlainDeepControl()
    fused = tvm.transform.Sequential([fuse, relax.transform.CanonicalizeBindings()])(mod)
    assert fuse.count == 2 and _ops(fused).count("dc_conv") == 2
    got, unfused = _run(fused, x.numpy()), _run(mod, x.numpy())
    for g, u, t in zip(got, unfused, _torch(model, x), strict=True):
        np.testing.assert_allclose(g, u, **TOL)  # the same as TVM's own build of the plain ops
        np.testing.assert_allclose(g, t, **TOL)
    again = FP.FusePlainDeepControl()
    assert again(fused).same_as(fused) and again.count == 0  # idempotent: nothing left to match
    with pytest.raises(ValueError, match="unknown plan"):
        FP.FusePlainDeepControl(lowering.LoweringOptions(plan="fast"))
    with lowering.options(plan="two_pass"):  # a pass keeps the options in force when it was made
        two_pass = FP.FusePlainDeepControl()
    assert "dc_two_pass" in _ops(two_pass(mod)) and two_pass.options.plan == "two_pass"


def _graph(x_shape: tuple[int, ...] = (2, 3, 8, 8), dtype: str = "float32", **conv
           ) -> tuple[tvm.IRModule, dict]:
    """A hand-built Relax graph: conv2d -> mean(axis=[-2, -1]) -> (y - m*a)*g + b -> relu6.

    ``dtype`` is the conv's input and weight type (its output stays float32 via ``out_dtype``).
    """
    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal((4, 3, 3, 3)).astype(dtype))
    a, g, b = (rng.uniform(0.5, 1.5, 4).astype("float32") for _ in range(3))
    xv = relax.Var("x", relax.TensorType(x_shape, dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, w, **{"padding": [1, 1, 1, 1], **conv}))
            m = bb.emit(relax.op.mean(y, axis=[-2, -1], keepdims=True))  # negative axes: normalised
            ma = bb.emit(relax.op.multiply(m, relax.const(a.reshape(1, 4, 1, 1))))
            d = bb.emit(relax.op.subtract(y, ma))
            z = bb.emit(relax.op.add(relax.op.multiply(d, relax.const(g.reshape(4, 1, 1))),
                                     relax.const(b.reshape(4, 1, 1))))
            out = bb.emit_output(relax.op.clip(z, 0, 6))
        bb.emit_func_output(out)
    return bb.get(), {"x": xv, "w": w, "a": a, "g": g, "b": b}


def test_before_expected():
    before, p = _graph()
    bb = relax.BlockBuilder()
    with bb.function("main", [p["x"]]):
        with bb.dataflow():
            out = emit_conv_deep_control(bb, p["x"], p["w"], None, relax.const(p["a"]), relax.const(p["g"]),
                                         relax.const(p["b"]), padding=1, act="relu6")
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    expected = bb.get()
    after, count = FP.fuse_plain_deep_control(before)
    assert count == 1
    canon = relax.transform.CanonicalizeBindings()  # the output var is bound to the kernels' result
    tvm.ir.assert_structural_equal(canon(after), canon(expected))
    x = _x(2, 3, 8, 8).numpy()
    np.testing.assert_allclose(_run(after, x)[0], _run(before, x)[0], **TOL)


@pytest.mark.parametrize("conv", [
    {"padding": [1, 1, 0, 0]},  # asymmetric: the kernels pad symmetrically
    {"data_layout": "NHWC", "out_layout": "NCHW"},  # NHWC input
    {"out_dtype": "float32"},  # with float16 data: a mixed-precision conv
], ids=["asym_padding", "nhwc", "out_dtype"])
def test_hand_built_graphs_left_alone(conv):
    shape = (2, 8, 8, 3) if conv.get("data_layout") == "NHWC" else (2, 3, 8, 8)
    mod, _ = _graph(shape, "float16" if "out_dtype" in conv else "float32", **conv)
    out, count = FP.fuse_plain_deep_control(mod)
    assert count == 0 and out.same_as(mod)


class _Negative(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.register_buffer("a", torch.full((4, 1, 1), 0.7))
        self.register_buffer("g", torch.full((4, 1, 1), 1.3))
        self.register_buffer("b", torch.full((4, 1, 1), 0.2))
        self.case = case

    def forward(self, x: torch.Tensor, s: torch.Tensor):
        y = self.conv(x)
        dims = {"wrong_axes": (1, 2, 3), "one_axis": (3,)}.get(self.case, (2, 3))
        m = y.mean(dims, keepdim=True)
        a = s if self.case == "a_not_constant" else self.a
        g = s if self.case == "g_not_constant" else self.g
        b = s if self.case == "b_not_constant" else self.b
        if self.case == "a_per_width":  # (C,) broadcasts over W (W == C here), not per channel
            a = self.a.reshape(4)
        base = self.conv2(x) if self.case == "other_conv" else y
        z = F.relu((base - a * m) * g + b)
        if self.case == "mean_two_users":
            return z, m * 2.0
        if self.case == "conv_two_users":
            return z + y
        return z


NEGATIVE = ["wrong_axes", "one_axis", "a_not_constant", "g_not_constant", "b_not_constant", "a_per_width",
            "other_conv", "mean_two_users", "conv_two_users"]


@pytest.mark.parametrize("case", NEGATIVE)
def test_left_alone(case):
    model = _Negative(case).eval()
    args = (_x(2, 3, 4, 4), torch.full((4, 1, 1), 0.9))
    mod = from_exported_program(torch.export.export(model, args))
    out, count = FP.fuse_plain_deep_control(mod)
    assert count == 0 and out.same_as(mod)


def test_left_alone_keeps_numerics():
    model = _Negative("mean_two_users").eval()
    args = (_x(2, 3, 4, 4), torch.full((4, 1, 1), 0.9))
    mod = from_exported_program(torch.export.export(model, args))
    assert FP.fuse_plain_deep_control(mod)[1] == 0
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=relax_pipeline(TARGET))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a.numpy()) for a in args))
    with torch.no_grad():
        expected = model(*args)
    for g, t in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.numpy(), t.numpy(), **TOL)


def test_act_with_an_outside_user_fuses_without_it():
    """z feeds the relu and is returned: Deep Control fuses (identity), the relu stays."""

    class TwoOut(PlainDC):
        def forward(self, x):
            y = self.convs[0](x)
            z = FORMS["folded"](y, y.mean((2, 3), keepdim=True), self.a0, self.g0, self.b0)
            return F.relu(z), z

    model, x = TwoOut("folded", ["relu"]), _x(2, 3, 6, 6)
    fused, count = FP.fuse_plain_deep_control(_import(model, x))
    assert count == 1 and "relax.nn.relu" in _ops(fused)
    for g, t in zip(_run(fused, x.numpy()), _torch(model, x), strict=True):
        np.testing.assert_allclose(g, t, **TOL)
