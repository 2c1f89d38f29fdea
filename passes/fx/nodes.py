"""Read convolutions, norm layers and activations off torch.fx nodes, in every form real code
and tracers produce: ``call_module`` (``nn.Conv2d``, ``nn.BatchNorm2d``...), functional
calls (``F.conv2d``, ``F.batch_norm``, ``torch.relu``, ``x.relu_()``...) and ATen ops from
``torch.export`` (``aten.conv2d``, ``aten.batch_norm``, ``aten.relu6``...).

Each reader returns a spec (what the node computes, with its tensors resolved), ``None``
when the node is not of that family at all, or a :class:`Unsupported` reason when it is
but cannot be rewritten safely.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten


class Unsupported(str):
    """A reason why a node of a known family cannot be rewritten."""


def attr_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node (None for a literal None)."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            return obj.detach()
    raise LookupError(f"{node} is not a parameter or buffer")


def _args(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of a call, by name."""
    out = dict(defaults)
    out.update(zip(names, node.args, strict=False))
    out.update(node.kwargs)
    return out


def _ntuple(v: Any, nd: int) -> tuple:
    return tuple(v) * (nd if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else (v,) * nd


# ---------------------------------------------------------------------------- convolutions

@dataclass
class ConvSpec:
    node: fx.Node
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    nd: int
    source: str  #: "module", "function" or "aten"
    module_path: str | None = None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2,
                   torch.conv3d: 3}
_CONV_ATEN = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
              aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}


def conv_spec(gm: fx.GraphModule, node: fx.Node) -> ConvSpec | Unsupported | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        base = next((c for c in _CONV_MODULES if isinstance(mod, c)), None)
        if base is None:
            return None
        if type(mod).forward is not base.forward:
            return Unsupported(f"{type(mod).__name__} overrides {base.__name__}.forward")
        nd = _CONV_MODULES[base]
        return ConvSpec(node, node.args[0], mod.weight.detach(),
                        None if mod.bias is None else mod.bias.detach(), tuple(mod.stride),
                        mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
                        tuple(mod.dilation), mod.groups, mod.padding_mode, nd, "module", node.target)
    if node.op != "call_function":
        return None
    if node.target in _CONV_FUNCTIONS or node.target in _CONV_ATEN:
        nd = _CONV_FUNCTIONS.get(node.target) or _CONV_ATEN[node.target]
        a = _args(node, _CONV_ARGS, _CONV_DEFAULTS)
        source = "function" if node.target in _CONV_FUNCTIONS else "aten"
    elif node.target is aten.convolution.default:
        a = _args(node, ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                         "output_padding", "groups"), {})
        if a["transposed"]:
            return Unsupported("transposed convolution")
        nd = len(a["stride"])
        source = "aten"
    else:
        return None
    try:
        weight, bias = attr_tensor(gm, a["weight"]), attr_tensor(gm, a["bias"])
    except LookupError:
        return Unsupported("convolution weight or bias is computed, not a parameter")
    padding = a["padding"] if isinstance(a["padding"], str) else _ntuple(a["padding"], nd)
    return ConvSpec(node, a["input"], weight, bias, _ntuple(a["stride"], nd), padding,
                    _ntuple(a["dilation"], nd), a["groups"], "zeros", nd, source)


# ---------------------------------------------------------------------------- norm layers

@dataclass
class NormSpec:
    node: fx.Node  #: the norm call
    output: fx.Node  #: the node carrying its result (a getitem for tuple-returning ATen ops)
    input: fx.Node
    kind: str  #: batchnorm, instancenorm, groupnorm
    num_features: int | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    eps: float
    batch_stats: bool  #: True: normalises by statistics of the data, not running ones
    module_path: str | None = None
    training: bool = False
    num_groups: int | None = None


def _bn_uses_batch_stats(mod: nn.modules.batchnorm._NormBase) -> bool:
    return mod.training or mod.running_mean is None


def norm_spec(gm: fx.GraphModule, node: fx.Node) -> NormSpec | Unsupported | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            kind = "batchnorm"
        elif isinstance(mod, nn.modules.instancenorm._InstanceNorm):
            kind = "instancenorm"
        elif isinstance(mod, nn.GroupNorm):
            kind = "groupnorm"
        else:
            return None
        allowed = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward,
                   nn.modules.instancenorm._InstanceNorm.forward, nn.GroupNorm.forward}
        if type(mod).forward not in allowed:
            return Unsupported(f"{type(mod).__name__} overrides forward")
        w = None if getattr(mod, "weight", None) is None else mod.weight.detach()
        b = None if getattr(mod, "bias", None) is None else mod.bias.detach()
        if kind == "groupnorm":
            return NormSpec(node, node, node.args[0], kind, mod.num_channels, w, b, None, None,
                            mod.eps, True, node.target, mod.training, mod.num_groups)
        rm = getattr(mod, "running_mean", None)
        rv = getattr(mod, "running_var", None)
        if kind == "batchnorm":
            batch = _bn_uses_batch_stats(mod)
        else:  # InstanceNorm uses running stats only in eval mode with track_running_stats
            batch = mod.training or not mod.track_running_stats
        return NormSpec(node, node, node.args[0], kind, mod.num_features, w, b,
                        None if rm is None else rm.detach(), None if rv is None else rv.detach(),
                        mod.eps, batch, node.target, mod.training)
    if node.op != "call_function":
        return None
    t = node.target
    if t is F.batch_norm:
        a = _args(node, ("input", "running_mean", "running_var", "weight", "bias", "training",
                         "momentum", "eps"), {"weight": None, "bias": None, "training": False,
                                              "momentum": 0.1, "eps": 1e-5})
        kind, batch = "batchnorm", bool(a["training"]) or a["running_mean"] is None
    elif t is aten.batch_norm.default:
        a = _args(node, ("input", "weight", "bias", "running_mean", "running_var", "training",
                         "momentum", "eps", "cudnn_enabled"), {})
        kind, batch = "batchnorm", bool(a["training"]) or a["running_mean"] is None
    elif t is aten._native_batch_norm_legit_no_training.default:
        a = _args(node, ("input", "weight", "bias", "running_mean", "running_var", "momentum",
                         "eps"), {})
        kind, batch = "batchnorm", False
    elif t is F.instance_norm:
        a = _args(node, ("input", "running_mean", "running_var", "weight", "bias",
                         "use_input_stats", "momentum", "eps"),
                  {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                   "use_input_stats": True, "momentum": 0.1, "eps": 1e-5})
        kind, batch = "instancenorm", bool(a["use_input_stats"])
    elif t is aten.instance_norm.default:
        a = _args(node, ("input", "weight", "bias", "running_mean", "running_var",
                         "use_input_stats", "momentum", "eps", "cudnn_enabled"), {})
        kind, batch = "instancenorm", bool(a["use_input_stats"])
    elif t in (F.group_norm, aten.group_norm.default):
        a = _args(node, ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
                  {"weight": None, "bias": None, "eps": 1e-5})
        kind, batch = "groupnorm", True
    else:
        return None
    try:
        tensors = {k: attr_tensor(gm, a.get(k)) for k in ("weight", "bias", "running_mean",
                                                          "running_var")}
    except LookupError:
        return Unsupported("norm parameters are computed, not parameters or buffers")
    output = node
    if t is aten._native_batch_norm_legit_no_training.default:
        getters = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(getters) != 1 or len(node.users) != 1:
            return Unsupported("batch-norm statistics outputs are used")
        output = getters[0]
    w = tensors["weight"]
    return NormSpec(node, output, a["input"], kind, None if w is None else w.shape[0], w,
                    tensors["bias"], tensors["running_mean"], tensors["running_var"],
                    float(a["eps"]), batch, None, False, a.get("num_groups"))


# ---------------------------------------------------------------------------- activations

@dataclass
class ActSpec:
    node: fx.Node
    name: str
    negative_slope: float = 0.01
    inplace: bool = False


_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu",
                nn.Hardswish: "hardswish", nn.SiLU: "silu"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                  F.silu: "silu", F.leaky_relu: "leaky_relu", torch.relu_: "relu",
                  F.relu_: "relu", F.leaky_relu_: "leaky_relu"}
_ACT_ATEN = {aten.relu.default: "relu", aten.relu_.default: "relu", aten.relu6.default: "relu6",
             aten.hardswish.default: "hardswish", aten.hardswish_.default: "hardswish",
             aten.silu.default: "silu", aten.silu_.default: "silu",
             aten.leaky_relu.default: "leaky_relu", aten.leaky_relu_.default: "leaky_relu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_INPLACE = {torch.relu_, F.relu_, F.leaky_relu_, aten.relu_.default, aten.hardswish_.default,
            aten.silu_.default, aten.leaky_relu_.default, aten.hardtanh_.default}


def _clamp_act(lo: Any, hi: Any) -> str | None:
    if lo == 0 and hi is None:
        return "relu"
    if lo == 0 and hi == 6:
        return "relu6"
    return None


def act_spec(gm: fx.GraphModule, node: fx.Node) -> ActSpec | None:
    """The activation a node applies to its first argument, or None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Hardtanh) and type(mod).forward is nn.Hardtanh.forward:
            name = _clamp_act(mod.min_val, mod.max_val)
            return ActSpec(node, name, inplace=mod.inplace) if name else None
        for cls, name in _ACT_MODULES.items():
            if type(mod) is cls:
                return ActSpec(node, name, getattr(mod, "negative_slope", 0.01),
                               getattr(mod, "inplace", False))
        return None
    if node.op == "call_method":
        if node.target in _ACT_METHODS:
            return ActSpec(node, _ACT_METHODS[node.target], inplace=node.target.endswith("_"))
        if node.target in ("clamp", "clamp_"):
            a = _args(node, ("self", "min", "max"), {"min": None, "max": None})
            name = _clamp_act(a["min"], a["max"])
            return ActSpec(node, name, inplace=node.target == "clamp_") if name else None
        return None
    if node.op != "call_function":
        return None
    t = node.target
    inplace = t in _INPLACE
    if t in _ACT_FUNCTIONS or t in _ACT_ATEN:
        name = _ACT_FUNCTIONS.get(t) or _ACT_ATEN[t]
        kw = _args(node, ("input", "arg1", "arg2"), {})
        slope = 0.01
        if name == "leaky_relu":
            slope = float(node.kwargs.get("negative_slope", kw.get("arg1", 0.01)))
        if t in (F.relu, F.relu6, F.hardswish, F.silu) and node.kwargs.get("inplace", kw.get("arg1")):
            inplace = True
        if t is F.leaky_relu and node.kwargs.get("inplace", kw.get("arg2")):
            inplace = True
        return ActSpec(node, name, slope, inplace)
    if t in (F.hardtanh, aten.hardtanh.default, aten.hardtanh_.default):
        a = _args(node, ("input", "min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0})
        name = _clamp_act(a["min_val"], a["max_val"])
        return ActSpec(node, name, inplace=inplace or bool(a.get("inplace"))) if name else None
    if t in (torch.clamp, aten.clamp.default):
        a = _args(node, ("input", "min", "max"), {"min": None, "max": None})
        name = _clamp_act(a["min"], a["max"])
        return ActSpec(node, name) if name else None
    return None


def following_act(gm: fx.GraphModule, node: fx.Node) -> ActSpec | None:
    """The activation (one the spec names) that is ``node``'s only user, else None: what a
    rewrite of ``node`` may absorb."""
    users = list(node.users)
    spec = act_spec(gm, users[0]) if len(users) == 1 else None
    return spec if spec is not None and spec.name is not None else None
