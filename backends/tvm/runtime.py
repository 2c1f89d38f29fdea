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
from collections.abc import Mapping, Sequence
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
from .runner import FORMAT, pad_batch, plan_batches, quiet_native_stderr, run_buckets

__all__ = ["FORMAT", "CompiledModel", "InputSpec", "RemoteModel", "load", "quiet_native_stderr"]


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


class CompiledModel:
    """A compiled model: call it with tensors (torch or numpy) of the compiled shapes.

    Calling it copies nothing on a CPU target: a contiguous torch tensor (or numpy array)
    whose data is 64-byte aligned goes to the VM by DLPack, and the outputs come back by DLPack
    (torch tensors if any input was one, else numpy arrays) sharing the memory the VM wrote.
    A non-contiguous or misaligned input (TVM's kernels assume 64-byte alignment; numpy
    allocates at 16 or 32) is copied once first. The Relax VM allocates its outputs afresh on
    every call and never reuses memory that a live result holds, so a result stays valid after
    later calls; an output that is an input passed through is cloned, so it never aliases the
    caller's tensor. (An output that is a constant of the model would share the VM's copy of
    that constant: do not write into it.) On CUDA, torch CUDA tensors pass by DLPack both ways;
    other inputs are copied to the GPU and the outputs copied back to the host, as before.

    A model compiled with batch buckets (``entries``, :mod:`.buckets`) takes any batch size: a
    batch that is a bucket is one call as above; any other is split (and zero-padded where the
    buckets need it) into the calls :func:`.runner.plan_batches` picks, the outputs concatenated.
    """

    def __init__(self, executable: Any, target: tvm.target.Target, inputs: Sequence[InputSpec],
                 kernels: Sequence[KernelInfo], path: str | None = None,
                 entries: Mapping[int, str] | None = None) -> None:
        self.executable = executable
        self.target = target
        self.inputs = list(inputs)
        self.kernels = list(kernels)
        self.path = path
        #: batch buckets (``{batch: VM function}``) of a model compiled with ``max_batch``; empty
        #: for one static batch (see :mod:`.buckets`)
        self.entries = dict(sorted((int(b), n) for b, n in (entries or {}).items()))
        #: where the tuned kernels' records came from (a database directory, dcgraph's shipped
        #: records, ...); None when no records were applied
        self.records: str | None = None
        self._vm: relax.VirtualMachine | None = None
        self._fns: dict[str, Any] = {}  # the VM's entry functions, looked up once
        self._dev = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
        self._on_cpu = _is_cpu(self._dev)
        self._torch_specs = {name: [((b, *i.shape[1:]) if self.entries else tuple(i.shape),
                                     getattr(torch, i.dtype, None)) for i in self.inputs]
                             for b, name in (self.entries or {0: "main"}).items()}

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
        if self.entries:
            line += f"; batch buckets {', '.join(map(str, self.entries))} (any batch size)"
        if self.records and tuned:
            line += f"; records: {self.records}"
        if self.untuned and self.records:
            line += (f"; {len(self.untuned)} Deep Control kernels on default schedules (no record, or the "
                     "default won the tuning)")
        elif self.untuned:
            line += f"; UNTUNED: {len(self.untuned)} Deep Control kernels on default schedules (dcgraph tune)"
        return line

    # -- running -----------------------------------------------------------------------------
    def device(self) -> tvm.runtime.Device:
        return self._dev

    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            if not targets_.runs_here(self.target):
                raise CompileError(f"code for {targets_.describe(self.target)} does not run on this machine; "
                                   "use .remote(session) (ARM over RPC) or export() it")
            self._vm = relax.VirtualMachine(self.executable, self.device())
        return self._vm

    def _checked(self, args: Sequence[Any]) -> list[torch.Tensor | np.ndarray]:
        """The inputs, shape- and dtype-checked against the signature: torch tensors (detached)
        stay torch tensors, anything else becomes a numpy array; nothing is copied."""
        if len(args) != len(self.inputs):
            raise CompileError(f"expected {len(self.inputs)} inputs, got {len(args)}")
        checked: list[torch.Tensor | np.ndarray] = []
        for i, (arg, spec) in enumerate(zip(args, self.inputs, strict=True)):
            arr = arg.detach() if isinstance(arg, torch.Tensor) else np.asarray(arg)
            shape = tuple(arr.shape)
            if len(shape) != len(spec.shape) or any(
                    s not in (-1, a) for s, a in zip(spec.shape, shape, strict=True)):
                raise CompileError(f"input {i} ({spec.name}) has shape {shape}; "
                                   f"the model was compiled for {spec.shape}")
            dtype = _dtype_name(arr)
            if dtype != spec.dtype:
                raise CompileError(f"input {i} ({spec.name}) is {dtype}; the model takes {spec.dtype}")
            checked.append(arr)
        return checked

    def check_inputs(self, args: Sequence[Any]) -> list[np.ndarray]:
        """The inputs as C-contiguous host numpy arrays (copied where needed), checked against the
        signature: what an RPC session sends."""
        return [np.ascontiguousarray(a.cpu().numpy() if isinstance(a, torch.Tensor) else a)
                for a in self._checked(args)]

    def _tvm_inputs(self, args: Sequence[Any]) -> list[tvm.runtime.Tensor]:
        """The checked inputs as TVM tensors on the VM's device: by DLPack where the memory is
        usable as it is, copied once where not (see the class docstring)."""
        dev = self.device()
        return [_to_device(a, dev) for a in self._checked(args)]

    def _fast_inputs(self, args: Sequence[Any], name: str = "main") -> list[tvm.runtime.Tensor] | None:
        """The common call, checked cheaply: CPU target, contiguous 64-byte aligned CPU torch
        tensors of exactly the shapes and dtypes of entry ``name``, passed by DLPack; None
        otherwise (the general path then checks, explains and copies what it must)."""
        specs = self._torch_specs[name]
        if not self._on_cpu or len(args) != len(specs):
            return None
        out = []
        for a, (shape, dtype) in zip(args, specs, strict=True):
            if not (isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dtype == dtype
                    and a.shape == shape and a.is_contiguous() and a.data_ptr() % _ALIGNMENT == 0
                    and not a.requires_grad):
                return None
            out.append(tvm.runtime.from_dlpack(a))
        return out

    def __call__(self, *args: Any) -> Any:
        if not self.entries:
            return self._call_entry("main", args)
        fast = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and args[0].ndim else None
        if fast in self.entries and self._fast_inputs(args, self.entries[fast]) is not None:
            return self._call_entry(self.entries[fast], args)  # a batch that is a bucket: no copy
        checked = self._checked(args)
        batches = {int(a.shape[0]) for a in checked}
        if len(batches) != 1:
            raise CompileError(f"the inputs disagree on the batch size: {sorted(batches)}")
        parts, lo = [], 0
        for bucket, take in plan_batches(batches.pop(), list(self.entries)):
            chunk = [_pad_batch(a[lo:lo + take], bucket) for a in checked]
            out = self._call_entry(self.entries[bucket], chunk)
            parts.append(_leaf_map(lambda t, take=take: t[:take], out))
            lo += take
        return _concat(parts)

    def _call_entry(self, name: str, args: Sequence[Any]) -> Any:
        """One call of the VM function ``name`` (``main``, or a batch bucket's entry)."""
        fast = self._fast_inputs(args, name)
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fns[name] = self.vm()[name]
        if fast is not None:
            out = fn(*fast)
            spans = [(a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()) for a in args]
            return _unpack(out, _Shared(True, spans))
        tensors = self._tvm_inputs(args)
        out = fn(*tensors)
        as_torch = any(isinstance(a, torch.Tensor) for a in args)
        if self._on_cpu:
            return _unpack(out, _Shared(as_torch, [_span(t) for t in tensors]))
        on_gpu = as_torch and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        convert = _Shared(as_torch, [_span(t) for t in tensors]) if on_gpu else _host_copy(as_torch)
        return _unpack(out, convert)

    def time(self, *args: Any, number: int = 10, repeat: int = 5) -> list[float]:
        """Per-call seconds over ``repeat`` runs of ``number`` calls (TVM's time_evaluator)."""
        dev = self.device()
        tensors = self._tvm_inputs(args)
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
        if self.entries:
            meta["batch"] = {"entries": {str(b): n for b, n in self.entries.items()}}
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


def _target_json(target: tvm.target.Target) -> dict:
    out = {}
    for k, v in target.export().items():
        if k in ("host", "keys", "tag") or k.startswith("feature."):
            continue  # derived by TVM from kind/mtriple/mcpu when the target is rebuilt
        out[k] = v if isinstance(v, bool | int | float | str) else [str(i) for i in v]
    return out


_ALIGNMENT = 64  # bytes: what TVM's generated code assumes of every tensor's data


def _is_cpu(dev: tvm.runtime.Device) -> bool:
    return dev.dlpack_device_type() == tvm.cpu(0).dlpack_device_type()


def _dtype_name(arr: torch.Tensor | np.ndarray) -> str:
    """numpy's spelling of the element type (``float32``) for a torch tensor or a numpy array."""
    return str(arr.dtype).removeprefix("torch.")


def _to_device(arr: torch.Tensor | np.ndarray, dev: tvm.runtime.Device) -> tvm.runtime.Tensor:
    """A TVM tensor on ``dev`` for a checked input: the same memory (DLPack) when it is on ``dev``,
    contiguous and 64-byte aligned; otherwise one copy."""
    if isinstance(arr, torch.Tensor):
        if _is_cpu(dev):
            want = torch.device("cpu")
        else:
            want = torch.device("cuda", dev.index)
            if not arr.is_cuda:  # a host tensor for the GPU: one host-to-device copy, as before
                return tvm.runtime.tensor(np.ascontiguousarray(arr.numpy()), dev)
        t = arr.to(want)
        if not t.is_contiguous() or t.data_ptr() % _ALIGNMENT:
            t = t.clone(memory_format=torch.contiguous_format)  # torch allocates 64-byte aligned
        with contextlib.suppress(RuntimeError, BufferError, TypeError, ValueError):
            return tvm.runtime.from_dlpack(t)
        return tvm.runtime.tensor(np.ascontiguousarray(t.cpu().numpy()), dev)
    if _is_cpu(dev) and arr.flags.c_contiguous and arr.ctypes.data % _ALIGNMENT == 0:
        with contextlib.suppress(RuntimeError, BufferError, TypeError, ValueError):
            return tvm.runtime.from_dlpack(arr)
    return tvm.runtime.tensor(np.ascontiguousarray(arr), dev)


def _span(t: tvm.runtime.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` a compact tensor's data covers."""
    return t.data_ptr(), t.data_ptr() + tvm.runtime.DataType(str(t.dtype)).itemsize * t.numel()


class _Shared:
    """Outputs by DLPack (zero copy) as torch tensors or numpy arrays; a clone for an output
    whose memory overlaps one of the inputs (a pass-through), so it never aliases the caller's."""

    def __init__(self, as_torch: bool, spans: Sequence[tuple[int, int]]) -> None:
        self.as_torch = as_torch
        self.spans = spans  # the inputs' [start, end) bytes

    def __call__(self, t: tvm.runtime.Tensor) -> torch.Tensor | np.ndarray:
        if self.as_torch:
            out = torch.from_dlpack(t)
            lo, size = out.data_ptr(), out.numel() * out.element_size()
        else:
            out = np.from_dlpack(t)
            lo, size = out.ctypes.data, out.nbytes
        if any(lo < b and a < lo + size for a, b in self.spans):
            return out.clone() if self.as_torch else out.copy()
        return out


def _host_copy(as_torch: bool):
    """Outputs copied to host numpy arrays (an RPC session's, a GPU's for host inputs), as torch
    tensors if asked."""
    def convert(t: Any) -> torch.Tensor | np.ndarray:
        arr = t.numpy()
        return torch.from_numpy(arr) if as_torch else arr
    return convert


def _unpack(out: Any, convert: Any) -> Any:
    """The VM's result (a tensor or nested tuples of them) with every tensor converted; a
    one-element tuple is unwrapped."""
    if isinstance(out, tvm.runtime.Tensor):
        return convert(out)
    items = [_unpack(o, convert) for o in out]
    return items[0] if len(items) == 1 else tuple(items)


def _flatten(out: Any) -> list[Any]:
    return [leaf for item in out for leaf in _flatten(item)] if isinstance(out, tuple) else [out]


def _leaf_map(fn: Any, out: Any) -> Any:
    return tuple(_leaf_map(fn, o) for o in out) if isinstance(out, tuple) else fn(out)


def _concat(parts: Sequence[Any]) -> Any:
    """Bucket calls' outputs (same nesting each) put back together along the batch."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(_concat(list(p)) for p in zip(*parts, strict=True))
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def _pad_batch(a: torch.Tensor | np.ndarray, bucket: int) -> torch.Tensor | np.ndarray:
    """``a`` zero-padded along the batch up to ``bucket`` samples."""
    if isinstance(a, torch.Tensor):
        return a if a.shape[0] == bucket else torch.cat([a, a.new_zeros((bucket - a.shape[0], *a.shape[1:]))])
    return pad_batch(a, bucket)


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
    entries = (meta.get("batch") or {}).get("entries", {})
    return CompiledModel(ex, target, inputs, kernels, str(path), {int(b): n for b, n in entries.items()})


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

    def _call(self, name: str, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = self.vm[name](*[tvm.runtime.tensor(a, self.dev) for a in arrays])
        return _flatten(_unpack(out, _host_copy(False)))

    def __call__(self, *args: Any) -> Any:
        arrays = self.compiled.check_inputs(args)
        as_torch = any(isinstance(a, torch.Tensor) for a in args)
        if not self.compiled.entries:
            out = self.vm["main"](*[tvm.runtime.tensor(a, self.dev) for a in arrays])
            return _unpack(out, _host_copy(as_torch))
        outs = run_buckets(self._call, self.compiled.entries, arrays, arrays[0].shape[0])
        outs = [torch.from_numpy(o) for o in outs] if as_torch else outs
        return outs[0] if len(outs) == 1 else tuple(outs)
