"""``compile``: a PyTorch model, exported program, ONNX model or Relax module -> a compiled model.

The path: norms converted to Deep Control and fused (dcgraph's torch or ONNX passes) ->
imported into Relax (fused ops become dcgraph's kernels; Deep Control left as plain ops is
fused by :mod:`.fuse_plain`) -> TVM's fusion -> tuned records where a database has them,
dcgraph's default schedules elsewhere -> a Relax VM executable for the target.

A :class:`CompiledModel` runs on this machine when the target does, reports which kernels
are tuned, exports a deployable shared library (``.so`` + a small ``.json`` with the input
signature) and is loaded back with :func:`load`. For a target that runs elsewhere (ARM),
:meth:`CompiledModel.remote` uploads the library over TVM RPC and runs it there.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from tvm import relax

from . import targets as targets_
from .pipeline import KernelInfo, kernel_report, lower_pipeline, optimize

FORMAT = "dcgraph-tvm/1"


class CompileError(ValueError):
    """The model cannot be compiled as asked, with the reason in one line."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def _as_tuple(example: Any) -> tuple[torch.Tensor, ...]:
    if example is None:
        return ()
    if isinstance(example, torch.Tensor | np.ndarray):
        example = (example,)
    return tuple(torch.as_tensor(e) for e in example)


def _import(model: Any, example: tuple[torch.Tensor, ...], plan: str, convert: bool,
            shape: dict | None) -> tvm.IRModule:
    """Relax module for any supported model kind (dcgraph's passes first when ``convert``)."""
    if isinstance(model, tvm.IRModule):
        return model
    if isinstance(model, str | Path) and str(model).endswith(".pt2"):
        from dcgraph import ops  # noqa: F401 - the op must be registered before loading

        model = torch.export.load(str(model))
    if isinstance(model, str | Path) or type(model).__name__ == "ModelProto":
        import onnx

        from .frontends.from_onnx import from_onnx

        if isinstance(model, str | Path):
            if not Path(model).is_file():
                raise CompileError(f"no such file: {model}")
            model = onnx.load(str(model))
        if convert:
            from dcgraph.passes.onnx import rewrite_onnx

            model, _ = rewrite_onnx(model)
        if shape is None and example:  # symbolic dims (a dynamic batch) take the example's sizes
            init = {i.name for i in model.graph.initializer}
            names = [i.name for i in model.graph.input if i.name not in init]
            shape = {n: tuple(e.shape) for n, e in zip(names, example, strict=False)}
        return from_onnx(model, shape=shape, plan=plan)

    from .frontends.from_torch import from_torch

    if isinstance(model, torch.export.ExportedProgram):
        if example and _dynamic(model):
            # kernels are scheduled for static shapes (a symbolic batch ran ResNet-18 3.6x slower)
            with torch.no_grad():
                model = torch.export.export(model.module(), example)
        return from_torch(model, plan=plan)
    if isinstance(model, torch.nn.Module):
        if not example:
            raise CompileError("a torch model needs example inputs (their shapes are compiled in)")
        if convert:
            from dcgraph.passes.pipeline import convert_model

            if len(example) != 1:
                raise CompileError("converting norms takes one example input; pass convert=False "
                                   "for a multi-input model that is already rewritten")
            program = convert_model(model, example[0], dynamic_batch=False, verify=False).program
        else:
            with torch.no_grad():
                program = torch.export.export(model.eval(), example)
        return from_torch(program, plan=plan)
    raise CompileError(f"cannot compile a {type(model).__name__}: expected a torch.nn.Module, "
                       "an ExportedProgram, an ONNX model or path, or a tvm.IRModule")


def _dynamic(program: torch.export.ExportedProgram) -> bool:
    vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]
    return any(not isinstance(d, int) for v in vals if isinstance(v, torch.Tensor) for d in v.shape)


def _inputs_of(mod: tvm.IRModule) -> list[InputSpec]:
    func = mod["main"]
    n = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    specs = []
    for p in list(func.params)[:n]:
        ty = p.ty
        shape = tuple(int(s) if isinstance(s, tvm.tirx.IntImm | int) else -1 for s in ty.shape)
        specs.append(InputSpec(str(p.name), shape, str(ty.dtype)))
    return specs


def prepare(model: Any, example_inputs: Any = None, *, plan: str = "auto", convert: bool = True,
            fuse_plain: bool = True, shape: dict | None = None) -> tvm.IRModule:
    """The Relax module :func:`compile` builds (and :func:`.tune.tune` extracts kernels from):
    the model imported (dcgraph's passes first when ``convert``), plain-op Deep Control fused."""
    mod = _import(model, _as_tuple(example_inputs), plan, convert, shape)
    if fuse_plain:
        from .fuse_plain import fuse_plain_deep_control

        mod, _ = fuse_plain_deep_control(mod, plan=plan)
    return mod


def compile(
    model: Any, target: str | dict | tvm.target.Target | None = "x86",
    example_inputs: Any = None, *, plan: str = "auto", convert: bool = True,
    fuse_plain: bool = True, database: Any = None, shape: dict | None = None,
) -> CompiledModel:
    """Compile ``model`` for ``target`` (preset name, dict, tag or Target).

    ``example_inputs``: a tensor or tuple for a torch model (shapes are compiled in).
    ``convert``: run dcgraph's norm-to-Deep-Control passes first. ``fuse_plain``: fuse Deep
    Control written as plain ops in Relax. ``database``: a MetaSchedule database, or a directory:
    one written by ``dcgraph tune`` (the sub-database for ``target`` is used) or a single
    JSON database; its records win over the default schedules.
    """
    tgt = targets_.resolve(target)
    mod = prepare(model, example_inputs, plan=plan, convert=convert, fuse_plain=fuse_plain, shape=shape)
    if isinstance(database, str | Path):
        from .tune import open_database  # a tuning directory (one sub-database per target) or one database

        database = open_database(database, tgt)
    inputs = _inputs_of(mod)
    mod = optimize(mod, tgt, database)
    kernels = kernel_report(mod)
    ex = tvm.compile(mod, target=tgt, relax_pipeline=lower_pipeline(tgt))
    return CompiledModel(ex, tgt, inputs, kernels)


class CompiledModel:
    """A compiled model: call it with tensors (torch or numpy) of the compiled shapes."""

    def __init__(self, executable: Any, target: tvm.target.Target, inputs: Sequence[InputSpec],
                 kernels: Sequence[KernelInfo], path: str | None = None) -> None:
        self.executable = executable
        self.target = target
        self.inputs = list(inputs)
        self.kernels = list(kernels)
        self.path = path
        self._vm: relax.VirtualMachine | None = None

    # -- reporting ---------------------------------------------------------------------------
    @property
    def untuned(self) -> list[KernelInfo]:
        """The fused Deep Control kernels running a default (untuned) schedule."""
        return [k for k in self.kernels if k.origin == "dcgraph" and k.schedule != "tuned"]

    def summary(self) -> str:
        dc = [k for k in self.kernels if k.origin == "dcgraph"]
        tuned = sum(k.schedule == "tuned" for k in self.kernels)
        line = (f"{targets_.describe(self.target)}: {len(self.kernels)} kernels, {len(dc)} Deep Control, "
                f"{tuned} tuned")
        if self.untuned:
            line += f"; UNTUNED: {len(self.untuned)} Deep Control kernels on default schedules (dcgraph tune)"
        return line

    # -- running -----------------------------------------------------------------------------
    def device(self) -> tvm.runtime.Device:
        return tvm.cuda(0) if self.target.kind.name == "cuda" else tvm.cpu(0)

    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            if not targets_.runs_here(self.target):
                raise CompileError(f"code for {targets_.describe(self.target)} does not run on this machine; "
                                   "use .remote(session) (ARM over RPC) or export() it")
            self._vm = relax.VirtualMachine(self.executable, self.device())
        return self._vm

    def check_inputs(self, args: Sequence[Any]) -> list[np.ndarray]:
        if len(args) != len(self.inputs):
            raise CompileError(f"expected {len(self.inputs)} inputs, got {len(args)}")
        arrays = []
        for i, (arg, spec) in enumerate(zip(args, self.inputs, strict=True)):
            arr = arg.detach().cpu().numpy() if isinstance(arg, torch.Tensor) else np.asarray(arg)
            if len(arr.shape) != len(spec.shape) or any(
                    s not in (-1, a) for s, a in zip(spec.shape, arr.shape, strict=True)):
                raise CompileError(f"input {i} ({spec.name}) has shape {tuple(arr.shape)}; "
                                   f"the model was compiled for {spec.shape}")
            if str(arr.dtype) != spec.dtype:
                raise CompileError(f"input {i} ({spec.name}) is {arr.dtype}; the model takes {spec.dtype}")
            arrays.append(np.ascontiguousarray(arr))
        return arrays

    def __call__(self, *args: Any) -> Any:
        arrays = self.check_inputs(args)
        dev = self.device()
        out = self.vm()["main"](*[tvm.runtime.tensor(a, dev) for a in arrays])
        as_torch = any(isinstance(a, torch.Tensor) for a in args)
        return _unpack(out, as_torch)

    def time(self, *args: Any, number: int = 10, repeat: int = 5) -> list[float]:
        """Per-call seconds over ``repeat`` runs of ``number`` calls (TVM's time_evaluator)."""
        dev = self.device()
        tensors = [tvm.runtime.tensor(a, dev) for a in self.check_inputs(args)]
        self.vm().set_input("main", *tensors)
        timer = self.vm().time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
        return list(timer("main").results)

    # -- deployment --------------------------------------------------------------------------
    def export(self, path: str | os.PathLike) -> Path:
        """Write a deployable shared library and ``<path>.json`` (signature, target, kernels); atomic."""
        path = Path(path)
        if path.suffix not in (".so", ".tar"):
            raise CompileError(f"export path must end in .so or .tar, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fcompile = None
        if targets_.is_arm(self.target) and not targets_.runs_here(self.target):
            from .emulation import cross_compiler

            fcompile = cross_compiler()
        meta = {"format": FORMAT, "target": _target_json(self.target),
                "inputs": [asdict(i) for i in self.inputs], "kernels": [asdict(k) for k in self.kernels]}
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".dcgraph-") as tmp:
            lib = Path(tmp) / path.name
            kwargs = {"fcompile": fcompile} if fcompile is not None else {}
            with quiet_native_stderr():
                self.executable.export_library(str(lib), **kwargs)
            side = Path(tmp) / (path.name + ".json")
            side.write_text(json.dumps(meta, indent=1))
            os.replace(side, str(path) + ".json")
            os.replace(lib, path)
        self.path = str(path)
        return path

    def remote(self, session: Any) -> RemoteModel:
        """Run on a TVM RPC server (an ARM board, or dcgraph's emulated one): export, upload, load."""
        return RemoteModel(self, session)


@contextlib.contextmanager
def quiet_native_stderr():
    """Hold back what TVM's C++ side writes to stderr (export and load log a "Scope Saving" /
    "Scope Loaded" warning per constant); replay it if the block raises."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _target_json(target: tvm.target.Target) -> dict:
    out = {}
    for k, v in target.export().items():
        if k in ("host", "keys", "tag") or k.startswith("feature."):
            continue  # derived by TVM from kind/mtriple/mcpu when the target is rebuilt
        out[k] = v if isinstance(v, bool | int | float | str) else [str(i) for i in v]
    return out


def _unpack(out: Any, as_torch: bool) -> Any:
    if isinstance(out, tvm.runtime.Tensor):
        arr = out.numpy()
        return torch.from_numpy(arr) if as_torch else arr
    items = [_unpack(o, as_torch) for o in out]
    return items[0] if len(items) == 1 else tuple(items)


def load(path: str | os.PathLike) -> CompiledModel:
    """Load a library written by :meth:`CompiledModel.export` (and its ``.json``)."""
    path = Path(path)
    side = Path(str(path) + ".json")
    if not path.is_file() or not side.is_file():
        raise CompileError(f"{path} and {side.name} must both exist (written by dcgraph compile)")
    meta = json.loads(side.read_text())
    if meta.get("format") != FORMAT:
        raise CompileError(f"{side} is not a dcgraph TVM library description (format {meta.get('format')!r})")
    target = tvm.target.Target(meta["target"])
    with quiet_native_stderr():
        ex = tvm.runtime.load_module(str(path))
    inputs = [InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in meta["inputs"]]
    kernels = [KernelInfo(**k) for k in meta["kernels"]]
    return CompiledModel(ex, target, inputs, kernels, str(path))


class RemoteModel:
    """A compiled model loaded on a TVM RPC server; call it like the local one."""

    def __init__(self, compiled: CompiledModel, session: Any) -> None:
        self.compiled = compiled
        self.session = session
        with tempfile.TemporaryDirectory(prefix="dcgraph-rpc-") as tmp:
            if compiled.path is None:
                # a fresh name per upload: re-uploading over a library the server has loaded
                # replaces a mapped file under it (its session dies with kShutdown)
                lib = compiled.export(Path(tmp) / f"model-{uuid.uuid4().hex[:12]}.so")
                compiled.path = None  # the temporary copy is not the model's home
            else:
                lib = Path(compiled.path)
            session.upload(str(lib))
            with quiet_native_stderr():
                self.module = session.load_module(lib.name)
        self.dev = session.cuda(0) if compiled.target.kind.name == "cuda" else session.cpu(0)
        self.vm = relax.VirtualMachine(self.module, self.dev)

    def __call__(self, *args: Any) -> Any:
        arrays = self.compiled.check_inputs(args)
        out = self.vm["main"](*[tvm.runtime.tensor(a, self.dev) for a in arrays])
        return _unpack(out, any(isinstance(a, torch.Tensor) for a in args))


def onnx_input_shape(model: Any, override: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The first graph input's shape (``override`` where dims are symbolic)."""
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise CompileError(f"the ONNX model has {len(inputs)} inputs; dcgraph compile takes one")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    if override is not None:
        if len(override) != len(shape) or any(s not in (-1, o) for s, o in zip(shape, override, strict=True)):
            raise CompileError(f"--input-shape {override} does not fit the model's input {shape}")
        return tuple(override)
    if -1 in shape:
        raise CompileError(f"the ONNX input {inputs[0].name!r} has symbolic dims {shape}: give --input-shape")
    return shape


def reference_output(model: Any, example: torch.Tensor) -> torch.Tensor:
    """What the compiled model should return: PyTorch (module / program) or onnxruntime (ONNX)."""
    if type(model).__name__ == "ModelProto":
        from dcgraph.onnx_tools import run

        init = {i.name for i in model.graph.initializer}
        name = next(i.name for i in model.graph.input if i.name not in init)
        return torch.from_numpy(run(model, {name: example.numpy()})[0])
    if isinstance(model, str | Path):
        from dcgraph import ops  # noqa: F401

        model = torch.export.load(str(model))
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    with torch.no_grad():
        out = model(example)
    return out[0] if isinstance(out, tuple | list) else out
