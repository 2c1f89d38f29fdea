"""Building and measuring candidates, in MetaSchedule's worker processes, with every output checked.

Kernels are built here (:func:`build`, without the 28 s ``tensor_intrin`` import of
MetaSchedule's default builder), exported as shared libraries (cross-compiled for ARM) and
measured by :class:`Runner`: on this CPU, or on a device of ``key`` requested from the tracker
for each candidate. Before timing, every candidate runs once on fixed pseudo-random inputs
(:func:`fixed_inputs`) and all its buffers are compared with the task's reference
(:func:`reference_outputs`: the unscheduled PrimFunc built for this machine's CPU). A candidate
that differs by more than :data:`CHECK_RTOL` fails with the :data:`WRONG` marker.

Errors carry a marker the loop reads: :data:`WRONG` (the check failed), :data:`UNAVAILABLE`
(no device of the key at the tracker) or :data:`LOST` (the device failed mid-measurement).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .tasks import Task

__all__ = ["CHECK_RTOL", "LOST", "UNAVAILABLE", "WRONG", "Runner", "build", "compare", "export", "export_arm",
           "fixed_inputs", "measure", "mismatch", "reason", "reference_outputs", "write_reference"]

#: a candidate whose outputs differ from the reference by more than this (relative to the
#: output's largest magnitude) is a wrong result; float32 reduction order alone stays ~1e-6
CHECK_RTOL = 1e-3
WRONG = "dcgraph: WRONG RESULT"
UNAVAILABLE = "dcgraph: NO DEVICE"
LOST = "dcgraph: DEVICE FAILED"



def build(mod: tvm.IRModule, target: tvm.target.Target, _params: Any) -> tvm.runtime.Module:
    """MetaSchedule's default build minus its ``import tvm.s_tir.tensor_intrin`` (28 s per worker)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def export(mod: tvm.runtime.Module) -> str:
    """A shared library for this machine (local runs and x86 RPC servers load it as is)."""
    path = os.path.join(tempfile.mkdtemp(prefix="dcgraph-ms-"), f"k-{uuid.uuid4().hex[:12]}.so")
    mod.export_library(path)
    return path


def export_arm(mod: tvm.runtime.Module) -> str:
    """A shared library for aarch64, linked here with the cross gcc (the device needs no compiler)."""
    from ..remote.arm_server import cross_compiler

    path = os.path.join(tempfile.mkdtemp(prefix="dcgraph-ms-"), f"k-{uuid.uuid4().hex[:12]}.so")
    mod.export_library(path, fcompile=cross_compiler())
    return path


def fixed_inputs(args_info: Sequence[Any]) -> list[np.ndarray]:
    """Fixed pseudo-random contents for every buffer of a kernel (the same in every process)."""
    rng = np.random.default_rng(1706_03907)
    arrays = []
    for info in args_info:
        _, dtype, shape = info
        dtype, shape = str(dtype), tuple(int(s) for s in shape)
        if "float" in dtype:
            arrays.append(rng.uniform(-1.0, 1.0, shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            arrays.append(rng.integers(0, 4, shape).astype(dtype))
    return arrays


def mismatch(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> str | None:
    """Why ``got`` differs from ``want`` (buffer index and relative error), or None."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            return f"buffer {i} has shape {g.shape}, expected {w.shape}"
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        same_nan = np.isnan(g64) == np.isnan(w64)
        if not same_nan.all():
            return f"buffer {i}: NaN where the reference has none (or the reverse)"
        fin = ~np.isnan(w64)
        if not fin.any():
            continue
        scale = max(float(np.abs(w64[fin]).max()), 1e-6)
        err = float(np.abs(g64[fin] - w64[fin]).max()) / scale
        if not err <= CHECK_RTOL:
            return f"buffer {i}: relative error {err:.1e} > {CHECK_RTOL:.0e}"
    return None


def measure(job: dict[str, Any]) -> list[float]:
    """One candidate: load it (here or on a device from the tracker), run it once on the fixed
    inputs and compare every buffer with the reference, then time it. Runs in a pool worker.

    Errors carry a marker: :data:`WRONG` (the check failed), :data:`UNAVAILABLE` (no device of
    the key at the tracker) or :data:`LOST` (the device failed mid-measurement, over RPC)."""
    try:
        return measure_on(job)
    except Flagged as exc:
        raise RuntimeError(str(exc)) from None
    except Exception as exc:
        if job["rpc"] is None:
            raise
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise RuntimeError(f"{LOST}: {type(exc).__name__}: {lines[-1] if lines else ''}") from None


class Flagged(Exception):
    """A measurement error that already carries its marker."""


def measure_on(job: dict[str, Any]) -> list[float]:
    from tvm import runtime

    session, remote_name = None, None
    try:
        if job["rpc"] is not None:
            from ..remote.rpc import DeviceUnavailable, request_session

            host, port, key, timeout = job["rpc"]
            try:
                session = request_session(host, port, key, timeout=timeout)
            except DeviceUnavailable as exc:
                raise Flagged(f"{UNAVAILABLE}: {exc}") from None
            remote_name = os.path.basename(job["artifact"])
            session.upload(job["artifact"], remote_name)
            mod = session.load_module(remote_name)
            dev = session.device(job["device_type"], 0)
        else:
            mod = runtime.load_module(job["artifact"])
            dev = runtime.device(job["device_type"], 0)
        arrays = fixed_inputs(job["args_info"])
        tensors = [runtime.tensor(a, dev) for a in arrays]
        mod[mod.entry_name](*tensors)
        dev.sync()
        if job["ref"] is not None:
            got = [t.numpy() for t in tensors]
            with np.load(job["ref"]) as ref:
                want = [ref[f"a{i}"] for i in range(len(arrays))]
            why = mismatch(got, want)
            if why is not None:
                raise Flagged(f"{WRONG}: {why}")
        evaluator = mod.time_evaluator(mod.entry_name, dev, number=job["number"], repeat=job["repeat"],
                                       min_repeat_ms=job["min_repeat_ms"])
        return [float(c) for c in evaluator(*tensors).results]
    finally:
        if session is not None and remote_name is not None:
            with contextlib.suppress(Exception):  # the device may be gone; the error above says so
                session.remove(remote_name)


def compare(job: dict[str, Any]) -> list[list[float] | str]:
    """Seconds per call of each kernel in ``job["artifacts"]``, timed interleaved on this CPU: after a
    warm-up call of each, ``job["rounds"]`` rounds, each timing every kernel once (a block of calls
    of at least ``job["min_repeat_ms"]``), the order reversed every other round, so a slow spell of
    the machine falls on all of them alike. Runs in a pool worker; the kernels share one set of
    buffers (the fixed inputs).

    With ``job["ref"]`` (a reference's .npz), each kernel's buffers are first checked after one run
    on the fixed inputs: a kernel that differs gets a :data:`WRONG` message instead of times."""
    from tvm import runtime

    dev = runtime.device(job["device_type"], 0)
    mods = [runtime.load_module(a) for a in job["artifacts"]]
    arrays = fixed_inputs(job["args_info"])
    want = None
    if job.get("ref") is not None:
        with np.load(job["ref"]) as ref:
            want = [ref[f"a{i}"] for i in range(len(arrays))]
    out: list[list[float] | str] = [[] for _ in mods]
    tensors = [runtime.tensor(a, dev) for a in arrays]
    for i, m in enumerate(mods):
        if want is not None:
            tensors = [runtime.tensor(a, dev) for a in arrays]
            m[m.entry_name](*tensors)
            why = mismatch([t.numpy() for t in tensors], want)
            if why is not None:
                out[i] = f"{WRONG}: {why}"
    timed = [i for i in range(len(mods)) if not isinstance(out[i], str)]
    evaluators = {i: mods[i].time_evaluator(mods[i].entry_name, dev, number=1, repeat=1,
                                            min_repeat_ms=job["min_repeat_ms"]) for i in timed}
    for i in timed:
        evaluators[i](*tensors)
    for r in range(job["rounds"]):
        for i in (timed if r % 2 == 0 else timed[::-1]):
            out[i].append(float(evaluators[i](*tensors).mean))
    return out


@derived_object
class Future(ms.runner.PyRunnerFuture):
    def __init__(self, future: Any, timeout: float) -> None:
        super().__init__()
        self.future = future
        self.timeout = timeout

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> ms.runner.RunnerResult:
        try:
            secs = self.future.result()
        except TimeoutError:
            return ms.runner.RunnerResult(None, f"dcgraph: measurement timed out after {self.timeout:.0f} s")
        except Exception as exc:  # the worker's exception: keep its last line
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            return ms.runner.RunnerResult(None, lines[-1] if lines else type(exc).__name__)
        return ms.runner.RunnerResult(secs, None)


@derived_object
class Runner(ms.runner.PyRunner):
    """Measures with :func:`_measure`: one worker on this CPU, or one per device behind a tracker."""

    def __init__(self, rpc: tuple[str, int, str] | None, workers: int, timeout: float,
                 evaluator: ms.runner.EvaluatorConfig) -> None:
        super().__init__()
        from tvm.support.popen_pool import PopenPoolExecutor

        self.rpc = rpc
        self.timeout = timeout
        self.evaluator = evaluator
        self.reference: str | None = None  # the current task's reference outputs (.npz)
        self.pool = PopenPoolExecutor(max_workers=workers, timeout=timeout)

    def run(self, runner_inputs: list[ms.runner.RunnerInput]) -> list[ms.runner.RunnerFuture]:
        base = {"rpc": (*self.rpc, max(10.0, self.timeout - 10)) if self.rpc else None, "ref": self.reference,
                "number": self.evaluator.number, "repeat": self.evaluator.repeat,
                "min_repeat_ms": self.evaluator.min_repeat_ms}
        futures = []
        for ri in runner_inputs:
            job = {**base, "artifact": str(ri.artifact_path), "device_type": str(ri.device_type),
                   "args_info": [a.as_json() for a in ri.args_info]}
            futures.append(Future(self.pool.submit(measure, job), self.timeout))
        return futures

    def shutdown(self) -> None:
        self.pool.shutdown()


def reference_outputs(task: Task, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every buffer of ``task`` after one run on ``arrays``: its unscheduled PrimFunc built for this CPU."""
    lib = tvm.tirx.build(task.mod, target=tvm.target.Target("llvm"))
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*tensors)
    return [t.numpy() for t in tensors]


def write_reference(task: Task, directory: Path) -> Path:
    """The task's reference outputs on the fixed inputs, saved for the measuring workers (.npz)."""
    args_info = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])]
    outputs = reference_outputs(task, fixed_inputs(args_info))
    path = directory / f"ref-{uuid.uuid4().hex[:8]}.npz"
    np.savez(path, **{f"a{i}": out for i, out in enumerate(outputs)})
    return path


def reason(msg: str) -> str:
    """A measurement error's last line without the exception type and the marker."""
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else "error"
    for marker in (WRONG, UNAVAILABLE, LOST):
        if marker in text:
            return text.split(marker, 1)[1].lstrip(": ")
    return text.removeprefix("RuntimeError: ").removeprefix("dcgraph: ")

