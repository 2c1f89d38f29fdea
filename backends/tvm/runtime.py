"""A compiled model at run time: call it here, export it, load it back, run it over RPC.

:class:`CompiledModel` runs on this machine when its target does, reports which kernels are
tuned, exports a deployable shared library (``.so`` + a small ``.json`` with the input
signature, target and kernels) and is loaded back with :func:`load`. For a target that runs
elsewhere (ARM), :meth:`CompiledModel.remote` uploads the library over TVM RPC and returns a
:class:`RemoteModel` that runs it there.
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
from .errors import CompileError
from .pipeline import KernelInfo

FORMAT = "dcgraph-tvm/1"

__all__ = ["FORMAT", "CompiledModel", "InputSpec", "RemoteModel", "load", "quiet_native_stderr"]


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


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
            from .remote.arm_server import cross_compiler

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
