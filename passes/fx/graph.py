"""Graph surgery shared by the rules: tracing, module insertion, chain removal."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from dcgraph.nn import _DeepControlConvNd, _DeepControlNd


class Tracer(fx.Tracer):
    """``symbolic_trace`` that keeps dcgraph's modules as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (_DeepControlNd, _DeepControlConvNd)):
            return True
        return super().is_leaf_module(m, qualname)


class TraceFailure(ValueError):
    """torch.fx could not trace the model (data-dependent control flow, TorchScript calls...)."""


def trace(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model`` (the input is never modified); GraphModules are copied."""
    if isinstance(model, fx.GraphModule):
        return copy.deepcopy(model)
    model = copy.deepcopy(model)
    try:
        graph = Tracer().trace(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceFailure(
            f"torch.fx cannot trace {type(model).__name__}: {first}. Rewrite its torch.export "
            "program instead: dcgraph.passes.export.rewrite_exported(torch.export.export(model, "
            "inputs)), which is what `dcgraph convert` does.") from e
    return fx.GraphModule(model, graph, type(model).__name__)


def free_name(gm: fx.GraphModule, stem: str) -> str:
    """An attribute name not yet used on ``gm``."""
    stem = stem.replace(".", "_")
    name, i = stem, 0
    while hasattr(gm, name):
        i += 1
        name = f"{stem}_{i}"
    return name


def insert_module(gm: fx.GraphModule, path: str, module: nn.Module, after: fx.Node,
                  args: tuple) -> fx.Node:
    """Register ``module`` at ``path`` (replacing what was there) and call it after ``after``."""
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(after):
        return gm.graph.call_module(path, args)


def shared(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True if another node calls the same module as ``node``."""
    return any(n is not node and n.op == "call_module" and n.target == node.target
               for n in gm.graph.nodes)


def own_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module ``node`` calls, copied first if other nodes call it too (so that changing
    it for this call leaves the others alone)."""
    if not shared(gm, node):
        return gm.get_submodule(node.target)
    path = free_name(gm, node.target)
    gm.add_submodule(path, copy.deepcopy(gm.get_submodule(node.target)))
    node.target = path
    return gm.get_submodule(path)


def remove_chain(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (latest first) once nothing uses them."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(set(nodes), key=lambda n: -order[n]):
        if not node.users:
            gm.graph.erase_node(node)


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead nodes and modules, check the graph, regenerate the code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def module_dtype(t: torch.Tensor) -> dict:
    return {"dtype": t.dtype, "device": t.device}
