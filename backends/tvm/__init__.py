"""TVM lowering of the fused Deep Control op (installed as ``dcgraph.backends.tvm``).

``compile(model, target="x86"|"arm"|"cuda"|dict, example_inputs)`` -> :class:`CompiledModel`
(call it, ``.export(path)``, :func:`load` it back, ``.remote(session)`` for RPC devices).
Modules: :mod:`.kernels` (TE definitions), :mod:`.lowering` (emit into Relax),
:mod:`.frontends` (torch.export / ONNX importers), :mod:`.fuse_plain` (Relax pattern fusion),
:mod:`.schedules` (default CPU schedule), :mod:`.gpu` (default CUDA schedule),
:mod:`.pipeline`, :mod:`.targets` (presets), :mod:`.emulation` (ARM under qemu + RPC).
"""

from .compiler import CompiledModel, CompileError, compile, load
from .targets import PRESETS, TargetError, resolve

__all__ = ["PRESETS", "CompileError", "CompiledModel", "TargetError", "compile", "load", "resolve"]
