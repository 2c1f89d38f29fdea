"""``torch.compile(model, backend="dcgraph")``: Dynamo's graphs through dcgraph's passes and TVM.

Registered with Dynamo by the ``torch_dynamo_backends`` entry point in ``pyproject.toml`` (no
import needed). Each graph Dynamo hands over goes the way ``dcgraph.backends.tvm.compile`` takes a
model: its parameters and buffers frozen into constants, ``torch.export``, norms converted to Deep
Control (``init``, default ``preserve``: the converted model computes what the original does) and
fused, then TVM for the target with the default schedules or a tuning database. Options, as
``torch.compile(..., options={...})``:

- ``target``: a preset (``x86``, the host CPU, is the default), a target dict or a TVM Target;
- ``db``: a tuning database (``dcgraph tune``'s directory, or one JSON database);
- ``init``: how norms become Deep Control (``preserve``, ``identity``, ``paper``...);
- ``convert``: ``False`` for a model that already has Deep Control (norms are left as they are);
- ``plan``, ``layout`` and ``winograd``: the fused kernels' form, the CPU layout and whether 3x3
  stride-1 convs run as Winograd F(m, 3), as ``compile`` takes them;
- ``max_batch``: a graph with a symbolic batch is built once with batch buckets up to this size
  (as ``compile(..., max_batch=)``), and every batch size runs on that build; mark the batch
  dynamic on the first call (``torch._dynamo.mark_dynamic(x, 0)``) to get such a graph at once
  (``dynamic=True`` also makes BatchNorm's float attributes symbolic, which torch.export refuses);
- ``fallback``: ``"eager"`` (default: a graph that cannot be compiled runs as Dynamo traced it,
  with one log line on the ``dcgraph.torch_compile`` logger saying why) or ``"error"`` (raise).

What runs eagerly, never wrongly: a graph that needs gradients (grad mode on and a parameter or
input that requires grad: the TVM kernels are inference-only; call under ``torch.no_grad()`` or
``torch.inference_mode()``), one that writes module state (BatchNorm in training mode updates its
running statistics), inputs on another device than the target, and anything TVM cannot import.
Frozen weights are checked on every call (the same tensor objects, unchanged version counters):
an optimizer step or ``load_state_dict`` after compiling makes the next call rebuild the graph.
A graph with a symbolic size (Dynamo's automatic dynamic shapes after a second input shape) is
built once per concrete shape on first use, or once for all batch sizes with ``max_batch``.
:data:`counters` counts what happened.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

log = logging.getLogger("dcgraph.torch_compile")

#: ``graphs``: graphs Dynamo handed over; ``compiled``: graphs that run on TVM; ``fallback``:
#: graphs that run eagerly; ``builds``: TVM builds (one per graph and concrete shape, again after
#: a weight changed); ``rebuilds``: builds caused by a changed weight; ``eager_calls``: calls run
#: eagerly because they need gradients; ``converted`` / ``fused``: norms turned into Deep Control
#: and conv + Deep Control pairs fused, ``residual``: residual tails taken into fused blocks;
#: summed over builds.
counters: collections.Counter[str] = collections.Counter()

OPTIONS = ("target", "db", "init", "convert", "plan", "layout", "winograd", "max_batch", "fallback")


class Fallback(Exception):
    """Why a graph runs eagerly, in one line."""


@dataclass(frozen=True)
class Options:
    target: Any = "x86"
    db: Any = None
    init: str = "preserve"
    convert: bool = True
    plan: str = "auto"
    layout: str = "auto"
    winograd: bool = True
    max_batch: int | None = None
    fallback: str = "eager"

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> Options:
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"dcgraph backend: unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(OPTIONS)}")
        opts = cls(**options)
        if opts.fallback not in ("eager", "error"):
            raise ValueError(f"dcgraph backend: fallback must be 'eager' or 'error', got {opts.fallback!r}")
        return opts


def _is_static(value: Any) -> bool:
    """A parameter or buffer Dynamo lifted into a graph input (it marks them static)."""
    return isinstance(value, torch.nn.Parameter) or hasattr(value, "_dynamo_static_input_type")


def freeze(gm: fx.GraphModule, args: Sequence[Any], static: Sequence[int]) -> fx.GraphModule:
    """A copy of ``gm`` whose inputs at ``static`` are constants (``get_attr`` of buffers holding
    ``args[i]`` detached) and whose integer inputs (symbolic sizes) take the values in ``args``;
    its remaining inputs are the tensors that are not static, in order."""
    holder = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, args, strict=True)):
        if i in static:
            name = f"frozen_{i}"
            holder.register_buffer(name, value.detach())
            env[node] = graph.get_attr(name)
        elif isinstance(value, torch.Tensor):
            env[node] = graph.placeholder(node.name)
        else:  # a concrete size for a symbolic one
            env[node] = int(value)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
    for name, mod in gm.named_children():
        holder.add_module(name, mod)
    out = fx.GraphModule(holder, graph)
    out.graph.lint()
    return out


NEEDS_GRAD = ("it needs gradients (the TVM kernels are inference-only; call under torch.no_grad() "
              "or torch.inference_mode())")


MUTATES = ("it writes module state or its inputs (BatchNorm in training mode updates its running "
           "statistics; call model.eval())")


def needs_grad(args: Sequence[Any]) -> bool:
    """Grad mode is on and an input (a parameter, usually) requires grad: autograd must see the call."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _check_graph(args: Sequence[Any], static: Sequence[int], target: Any) -> None:
    """Raise :class:`Fallback` for a graph the TVM build must not take."""
    from .tvm.targets import is_gpu

    want = "cuda" if is_gpu(target) else "cpu"
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.device.type != want and i not in static:
            raise Fallback(f"an input is on {a.device}, the target runs on {want}")


def _writes_state(gm: fx.GraphModule) -> bool:
    """The graph writes into one of its inputs (an in-place op on a placeholder: BatchNorm's
    ``num_batches_tracked.add_(1)``) or into running statistics (``batch_norm(training=True)``)."""
    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if (isinstance(first, fx.Node) and first.op in ("placeholder", "get_attr") and name.endswith("_")
                and not name.endswith("__")):
            return True
        if node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            running = node.kwargs.get("running_mean", node.args[1] if len(node.args) > 1 else None)
            if training and running is not None:
                return True
    return False


def _export(frozen: fx.GraphModule, inputs: tuple[torch.Tensor, ...], opts: Options):
    """The frozen graph as an exported program, norms converted and fused when ``convert``."""
    from dcgraph.passes.export import rewrite_exported

    with torch.no_grad():
        ep = torch.export.export(frozen, inputs, strict=False)
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        raise Fallback(MUTATES)
    if not opts.convert:
        return ep
    ep, report = rewrite_exported(ep, opts.init)
    for rule, n in report.counts.items():
        if rule.startswith("fused+"):
            counters["residual"] += n
        else:
            counters["fused" if rule.endswith("->fused") else "converted"] += n
    return ep


class DcgraphGraph:
    """The callable Dynamo gets back for one graph: TVM builds per concrete input shape."""

    def __init__(self, gm: fx.GraphModule, example: Sequence[Any], opts: Options, index: int) -> None:
        from .tvm.targets import resolve

        self.gm, self.opts, self.index = gm, opts, index
        self.target = resolve(opts.target)  # a wrong target is the user's error: raised, not a fallback
        self.static = [i for i, a in enumerate(example) if _is_static(a)]
        self.sizes = [i for i, a in enumerate(example) if not isinstance(a, torch.Tensor)]
        #: one build for every batch size: ``max_batch`` given and the graph has symbolic sizes
        #: (a static graph only ever sees its one batch)
        self._bucketed = bool(opts.max_batch and self.sizes)
        self.frozen: list[tuple[torch.Tensor, int]] = [(example[i], example[i]._version) for i in self.static]
        self.builds: dict[tuple, Any] = {}
        self.eager: str | None = None  #: why the graph runs eagerly (None: it runs on TVM)
        self.told_grad = False
        self.built = False
        if not self.sizes and not needs_grad(example):  # sizes known: build now, while Dynamo compiles
            self._build(example)

    def describe(self) -> str:
        ops = sum(n.op == "call_function" or n.op == "call_method" for n in self.gm.graph.nodes)
        return f"graph {self.index} ({ops} ops)"

    def _tensors(self, args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """The inputs that are not frozen: what the TVM build takes."""
        return tuple(a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in self.static)

    def _key(self, args: Sequence[Any]) -> tuple:
        """What a build is for: the input shapes (without the batch with ``max_batch``: one
        build takes them all; then the size arguments, which follow the shapes, are left out)."""
        if self._bucketed:
            return tuple(tuple(a.shape[1:]) for a in self._tensors(args))
        return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else int(a)
                     for i, a in enumerate(args) if i not in self.static)

    def _build(self, args: Sequence[Any]) -> Callable | None:
        from .tvm import compile as tvm_compile

        try:
            _check_graph(args, self.static, self.target)
            if _writes_state(self.gm):
                raise Fallback(MUTATES)
            frozen = freeze(self.gm, args, self.static)
            inputs = self._tensors(args)
            ep = _export(frozen, inputs, self.opts)
            compiled = tvm_compile(ep, self.target, inputs, convert=False, plan=self.opts.plan,
                                   database=self.opts.db, layout=self.opts.layout,
                                   winograd=self.opts.winograd,
                                   max_batch=self.opts.max_batch if self._bucketed else None)
        except Exception as exc:
            if self.opts.fallback == "error":
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not isinstance(exc, Fallback):
                reason = f"{type(exc).__name__}: {reason}"
            self.eager = reason
            counters["fallback"] += 1
            log.warning("dcgraph: %s runs eagerly: %s", self.describe(), reason)
            return None
        counters["builds"] += 1
        if not self.built:
            counters["compiled"] += 1
            self.built = True
        self.builds[self._key(args)] = compiled
        return compiled

    def _weights_changed(self, args: Sequence[Any]) -> bool:
        return any(args[i] is not t or t._version != v
                   for i, (t, v) in zip(self.static, self.frozen, strict=True))

    def __call__(self, *args: Any) -> Any:
        if self.eager is not None:
            return self.gm(*args)
        if needs_grad(args):  # this call runs eagerly; a later one under no_grad runs on TVM
            if self.opts.fallback == "error":
                raise Fallback(f"dcgraph: {self.describe()}: {NEEDS_GRAD}")
            if not self.told_grad:
                log.warning("dcgraph: %s runs eagerly: %s", self.describe(), NEEDS_GRAD)
                self.told_grad = True
            counters["eager_calls"] += 1
            return self.gm(*args)
        if self._weights_changed(args):
            log.info("dcgraph: %s: a weight changed since it was built; rebuilding", self.describe())
            counters["rebuilds"] += 1
            self.builds.clear()
            self.frozen = [(args[i], args[i]._version) for i in self.static]
        compiled = self.builds.get(self._key(args)) or self._build(args)
        if compiled is None:
            return self.gm(*args)
        out = compiled(*self._tensors(args))
        return tuple(out) if isinstance(out, list | tuple) else (out,)


def dcgraph_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                    options: dict[str, Any] | None = None, **_: Any) -> Callable:
    """The Dynamo backend: ``torch.compile(model, backend="dcgraph", options={...})``."""
    opts = Options.parse(options)
    counters["graphs"] += 1
    return DcgraphGraph(gm, list(example_inputs), opts, counters["graphs"])


__all__ = ["OPTIONS", "DcgraphGraph", "Fallback", "Options", "counters", "dcgraph_backend", "freeze"]
