"""MetaSchedule autotuning of a model's kernels, on this machine or on devices behind a TVM RPC tracker.

``tune(model, target, example_inputs, trials=N, db=DIR)`` imports the model as
:func:`.compiler.compile` does (same passes, same fused kernels), extracts the kernels as
MetaSchedule tasks, spreads ``N`` trials across them and tunes them one after another, storing
every measured candidate in a JSON database under ``DIR/<target key>/``. Compiling later with
``compile(..., database=DIR)`` applies the best record of every kernel that has one; the
compiled model reports those kernels as ``tuned``.

The loop, per call:

1. **Tasks.** The module after TVM's legalize / FuseOps / FuseTIR (:func:`.pipeline.fuse`), its
   PrimFuncs extracted with ``ms.relax_integration.extract_tasks`` (structurally equal kernels
   are one task; the weight is how often the model calls it). Cost of a task = FLOPs per call x
   weight (``estimate_tir_flops``). Tasks under :data:`SKIP_SHARE` of the model's cost (reshapes,
   pooling, the tiny hoisted-mean kernels of small layers...) are not tuned: they keep dcgraph's
   default schedule, and the report lists them.
2. **Budget.** ``trials`` is the total for the model. Every tuned task gets at least
   :data:`MIN_TRIALS`, the rest goes by cost (largest remainder); when ``trials`` cannot give
   every task its minimum, the costliest tasks get it and the others are skipped ("budget").
3. **Resume.** ``trials`` is a target, not an increment: trials already in the database (search
   records of the task's workload) count towards each task's share, so a second ``tune`` with
   the same ``trials`` finishes what an interrupted one left and does nothing after a complete
   one; a larger ``trials`` spends only the difference. MetaSchedule's evolutionary search seeds
   its population from the database's best records, so a resumed search continues from them.
4. **Baseline.** Each task's default schedule (what ``compile`` runs without a record) is
   measured once on the same device, checked like any candidate and committed as a record, so
   the database's best is never slower than the default (the table's ``kept`` column says which
   won).
5. **Search.** ``ms.tune_tasks`` per task with MetaSchedule's evolutionary search and cost
   model: XGBoost when ``xgboost`` imports, else a random model (``cost_model="auto"``; the
   report states which). Batches of ``budget/4`` candidates (8 to 32), a population of 32 per
   candidate up to MetaSchedule's 512 (its full population for a handful of trials spends more
   time in the genetic search than in measuring, on two cores). One cost model for the run.
   Progress bar: task (trials done + to do), trials, best time so far. MetaSchedule's log
   goes to ``DIR/<target key>/logs/tune.log``, not the console.
6. **Measurement and checking.** Kernels are built here (:func:`_build`, without the 28 s
   ``tensor_intrin`` import of MetaSchedule's default builder), exported as shared libraries
   (cross-compiled for ARM) and measured by :class:`_Runner`: on this CPU, or on a device of
   ``key`` requested from the tracker at ``rpc`` for each candidate. Before timing, every
   candidate runs once on fixed pseudo-random inputs and all its buffers are compared with the
   task's reference (the unscheduled PrimFunc built for this machine's CPU). A candidate that
   differs (relative error over :data:`CHECK_RTOL`) is stored as a failed measurement, never
   as a usable record, and the report counts wrong results per task.

Every measured candidate is appended to the database as it is measured; an interrupted run
(Ctrl-C, a killed process or device) keeps them, and :func:`open_database` drops a line cut
short by a kill. A candidate whose measurement failed because the *device* failed (over RPC)
is not stored, so a resumed run measures it. When no measurement of a batch succeeds because
no device can be reached (or two batches in a row fail), the run stops with :class:`TuneError`
(one line; the partial report is ``err.report``). One process at a time per database.

Not done: CUDA targets (MetaSchedule on a GPU needs a GPU runner and dlight-style spaces; the
function says so), and tasks below :data:`SKIP_SHARE` unless named in ``kernels``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from . import targets as targets_
from .lowering import KERNEL_ATTR

__all__ = ["CHECK_RTOL", "MIN_TRIALS", "SKIP_SHARE", "Task", "TaskReport", "TuneError", "TuneReport",
           "database_dir", "extract_tasks", "open_database", "split_budget", "target_key", "tune"]

log = logging.getLogger(__name__)

#: every tuned task gets at least this many trials (fewer are mostly random samples)
MIN_TRIALS = 8
#: tasks under this share of the model's FLOPs keep the default schedule
SKIP_SHARE = 0.01
#: a candidate whose outputs differ from the reference by more than this (relative to the
#: output's largest magnitude) is a wrong result; float32 reduction order alone stays ~1e-6
CHECK_RTOL = 1e-3
#: the evolutionary search's largest population (MetaSchedule's default); smaller for small batches
POPULATION = 512
COST_MODELS = ("auto", "xgb", "random")
_WRONG = "dcgraph: WRONG RESULT"
_UNAVAILABLE = "dcgraph: NO DEVICE"
_LOST = "dcgraph: DEVICE FAILED"
_DB_FILES = ("database_workload.json", "database_tuning_record.json")


class TuneError(RuntimeError):
    """Tuning cannot go on, with the reason in one line; ``report`` holds what was done."""

    def __init__(self, message: str, report: TuneReport | None = None) -> None:
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------------
# databases: one per target


def target_key(target: Any) -> str:
    """The database directory name for ``target``: kind, architecture, CPU (or GPU arch), features.

    ``llvm-x86_64-znver3``, ``llvm-aarch64-cortex-a72-neon``, ``cuda-sm_90``. ``num-cores`` is not
    part of it: records apply to the same CPU with any core count (their speed may differ).
    """
    t = targets_.resolve(target)
    attrs = t.attrs
    parts = [t.kind.name]
    if t.kind.name == "llvm":
        triple = str(attrs.get("mtriple", "")) or str(tvm.target.codegen.llvm_get_system_triple())
        parts += [triple.split("-")[0], str(attrs.get("mcpu", "")) or "generic"]
        mattr = sorted(str(a).lstrip("+") for a in attrs.get("mattr", []) or [])
        if mattr:
            parts.append("+".join(mattr))
    elif t.kind.name == "cuda":
        parts.append(str(attrs.get("arch", "")) or "sm")
    else:
        parts.append(str(attrs.get("mcpu", "")))
    text = "-".join(p for p in parts if p)
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in text)


def database_dir(db: str | os.PathLike, target: Any) -> Path:
    """``db/<target_key(target)>``: where ``tune`` keeps the records for ``target``."""
    return Path(db) / target_key(target)


def _repair(directory: Path) -> list[str]:
    """Drop a last line cut short by a kill from the database files; fail on damage elsewhere."""
    notes = []
    for name in _DB_FILES:
        path = directory / name
        if not path.is_file():
            continue
        text = path.read_text()
        lines = text.splitlines()
        good = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    notes.append(f"{path}: dropped a truncated last line (a run was killed while writing)")
                    break
                raise TuneError(f"{path}: line {i + 1} is not JSON; the database is damaged") from None
            good.append(line)
        else:
            if text.endswith("\n") or not text:
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in good))
        os.replace(tmp, path)
    for note in notes:
        log.warning(note)
    return notes


def open_database(path: str | os.PathLike, target: Any, *, create: bool = False) -> ms.database.JSONDatabase:
    """The JSON database for ``target`` under ``path``.

    ``path`` is a tuning directory written by :func:`tune` (the ``<target key>`` sub-directory
    is used) or one MetaSchedule JSON database directory (used as is). ``create``: make the
    target's sub-database if it is missing (tuning); otherwise a missing one is an error.
    """
    from .compiler import CompileError

    path = Path(path)
    if (path / _DB_FILES[0]).is_file():
        directory = path
    else:
        directory = database_dir(path, target)
        if not (directory / _DB_FILES[0]).is_file() and not create:
            have = sorted(p.name for p in path.iterdir() if (p / _DB_FILES[0]).is_file()) \
                if path.is_dir() else []
            raise CompileError(
                f"no tuning records for {targets_.describe(targets_.resolve(target))} in {path} "
                f"(expected {directory.name}/; " + (f"it has {', '.join(have)})" if have else "it has none)")
                + "; run dcgraph tune first")
    directory.mkdir(parents=True, exist_ok=True)
    _repair(directory)
    return ms.database.JSONDatabase(work_dir=str(directory), allow_missing=create)


# ---------------------------------------------------------------------------------------------
# tasks and budgets


@dataclass
class Task:
    """One kernel to tune: a MetaSchedule workload (``{"main": PrimFunc}``) and its weight."""

    name: str
    mod: tvm.IRModule
    weight: int
    flops: float
    origin: str  # "dcgraph" (a fused Deep Control kernel) or "tvm"

    @property
    def cost(self) -> float:
        return self.flops * self.weight


def extract_tasks(fused: tvm.IRModule, target: tvm.target.Target) -> list[Task]:
    """The kernels of a fused module (:func:`.pipeline.fuse`) as tasks, costliest first."""
    tasks = []
    for t in ms.relax_integration.extract_tasks(fused, target):
        mod = t.dispatched[0]
        func = mod["main"]
        attrs = func.attrs or {}
        origin = "dcgraph" if KERNEL_ATTR in attrs or "dc_" in t.task_name else "tvm"
        try:
            flops = float(tvm.s_tir.analysis.estimate_tir_flops(mod))
        except Exception:  # data movement only (reshape, copies): TVM cannot count it
            flops = 0.0
        tasks.append(Task(str(t.task_name), mod, int(t.weight), flops, origin))
    return sorted(tasks, key=lambda t: (-t.cost, t.name))


def split_budget(costs: Sequence[float], trials: int, min_trials: int = MIN_TRIALS) -> list[int]:
    """Trials per task: ``min_trials`` each (costliest first while the total allows), the rest by cost."""
    n = len(costs)
    out = [0] * n
    if trials <= 0 or n == 0:
        return out
    order = sorted(range(n), key=lambda i: -costs[i])
    k = min(n, max(1, trials // max(1, min_trials)))
    chosen = order[:k]
    base = min(min_trials, trials // k)
    for i in chosen:
        out[i] = base
    rest = trials - base * k
    total = sum(costs[i] for i in chosen)
    shares = [(rest * costs[i] / total if total > 0 else rest / k) for i in chosen]
    floors = [math.floor(s) for s in shares]
    for i, f in zip(chosen, floors, strict=True):
        out[i] += f
    left = rest - sum(floors)
    by_frac = sorted(range(k), key=lambda j: -(shares[j] - floors[j]))
    for j in by_frac[:left]:
        out[chosen[j]] += 1
    return out


def _search_trials(db: ms.database.Database, workload: Any) -> int:
    """How many search trials the database holds for ``workload`` (failed ones included)."""
    return sum(1 for rec in db.get_all_tuning_records() if rec.workload.same_as(workload) and _is_search(rec))


def _mean(run_secs: Any) -> float | None:
    vals = [float(getattr(v, "value", v)) for v in (run_secs or [])]
    vals = [v for v in vals if v < 1e9]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------------------------------------
# building and measuring (the functions below run in MetaSchedule's worker processes)


def _build(mod: tvm.IRModule, target: tvm.target.Target, _params: Any) -> tvm.runtime.Module:
    """MetaSchedule's default build minus its ``import tvm.s_tir.tensor_intrin`` (28 s per worker)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def _export(mod: tvm.runtime.Module) -> str:
    """A shared library for this machine (local runs and x86 RPC servers load it as is)."""
    path = os.path.join(tempfile.mkdtemp(prefix="dcgraph-ms-"), f"k-{uuid.uuid4().hex[:12]}.so")
    mod.export_library(path)
    return path


def _export_arm(mod: tvm.runtime.Module) -> str:
    """A shared library for aarch64, linked here with the cross gcc (the device needs no compiler)."""
    from .emulation import cross_compiler

    path = os.path.join(tempfile.mkdtemp(prefix="dcgraph-ms-"), f"k-{uuid.uuid4().hex[:12]}.so")
    mod.export_library(path, fcompile=cross_compiler())
    return path


def _inputs(args_info: Sequence[Any]) -> list[np.ndarray]:
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


def _mismatch(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> str | None:
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


def _measure(job: dict[str, Any]) -> list[float]:
    """One candidate: load it (here or on a device from the tracker), run it once on the fixed
    inputs and compare every buffer with the reference, then time it. Runs in a pool worker.

    Errors carry a marker: :data:`_WRONG` (the check failed), :data:`_UNAVAILABLE` (no device of
    the key at the tracker) or :data:`_LOST` (the device failed mid-measurement, over RPC)."""
    try:
        return _measure_on(job)
    except _Flagged as exc:
        raise RuntimeError(str(exc)) from None
    except Exception as exc:
        if job["rpc"] is None:
            raise
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise RuntimeError(f"{_LOST}: {type(exc).__name__}: {lines[-1] if lines else ''}") from None


class _Flagged(Exception):
    """A measurement error that already carries its marker."""


def _measure_on(job: dict[str, Any]) -> list[float]:
    from tvm import runtime

    session, remote_name = None, None
    try:
        if job["rpc"] is not None:
            from .rpc import DeviceUnavailable, request_session

            host, port, key, timeout = job["rpc"]
            try:
                session = request_session(host, port, key, timeout=timeout)
            except DeviceUnavailable as exc:
                raise _Flagged(f"{_UNAVAILABLE}: {exc}") from None
            remote_name = os.path.basename(job["artifact"])
            session.upload(job["artifact"], remote_name)
            mod = session.load_module(remote_name)
            dev = session.device(job["device_type"], 0)
        else:
            mod = runtime.load_module(job["artifact"])
            dev = runtime.device(job["device_type"], 0)
        arrays = _inputs(job["args_info"])
        tensors = [runtime.tensor(a, dev) for a in arrays]
        mod[mod.entry_name](*tensors)
        dev.sync()
        if job["ref"] is not None:
            got = [t.numpy() for t in tensors]
            if os.environ.get("DCGRAPH_TUNE_FAULT") == "wrong-output":  # test hook: a device with bad results
                got = [g + 1 if "float" in str(g.dtype) else g for g in got]
            with np.load(job["ref"]) as ref:
                want = [ref[f"a{i}"] for i in range(len(arrays))]
            why = _mismatch(got, want)
            if why is not None:
                raise _Flagged(f"{_WRONG}: {why}")
        evaluator = mod.time_evaluator(mod.entry_name, dev, number=job["number"], repeat=job["repeat"],
                                       min_repeat_ms=job["min_repeat_ms"])
        return [float(c) for c in evaluator(*tensors).results]
    finally:
        if session is not None and remote_name is not None:
            with contextlib.suppress(Exception):  # the device may be gone; the error above says so
                session.remove(remote_name)


@derived_object
class _Future(ms.runner.PyRunnerFuture):
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
class _Runner(ms.runner.PyRunner):
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
            futures.append(_Future(self.pool.submit(_measure, job), self.timeout))
        return futures

    def shutdown(self) -> None:
        self.pool.shutdown()


def _reference(task: Task, directory: Path) -> Path:
    """The task's outputs on the fixed inputs: its unscheduled PrimFunc built for this CPU."""
    func = task.mod["main"]
    args_info = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(func)]
    arrays = _inputs(args_info)
    lib = tvm.tirx.build(task.mod, target=tvm.target.Target("llvm"))
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*tensors)
    path = directory / f"ref-{uuid.uuid4().hex[:8]}.npz"
    np.savez(path, **{f"a{i}": t.numpy() for i, t in enumerate(tensors)})
    return path


def _default_schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.s_tir.Schedule:
    """What ``compile`` gives the kernel without a record, as a traced schedule (mirrors
    :func:`.schedules.schedule_func_cpu`; unscheduled where no default rule applies)."""
    from . import schedules

    sch = tvm.s_tir.Schedule(mod)
    lanes = schedules.vector_lanes(target)
    if schedules.schedule_conv_cpu(sch, lanes):
        return sch
    schedules.schedule_mean_cpu(sch, lanes)
    if schedules.schedule_reduction_cpu(sch):
        return sch
    sch = tvm.s_tir.Schedule(mod)
    sch.get_sblock("root")  # a database ignores records with an empty trace: give it one no-op step
    return sch


# ---------------------------------------------------------------------------------------------
# progress and failure tracking


@dataclass
class _TaskState:
    name: str
    best: float | None = None
    ok: int = 0
    wrong: int = 0
    errors: int = 0
    build_errors: int = 0
    last_error: str = ""


def _reason(msg: str) -> str:
    """A measurement error's last line without the exception type and the marker."""
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else "error"
    for marker in (_WRONG, _UNAVAILABLE, _LOST):
        if marker in text:
            return text.split(marker, 1)[1].lstrip(": ")
    return text.removeprefix("RuntimeError: ").removeprefix("dcgraph: ")


class _Tracker:
    """The measure callback's state: commits the records, counts per task, decides to stop."""

    def __init__(self, bar: Any, database: Any) -> None:
        self.bar = bar
        self.database = database
        self.state: _TaskState | None = None
        self.workload: Any = None
        self.target: tvm.target.Target | None = None
        self.failed_batches = 0
        self.abort: str | None = None

    def batch(self, candidates: Sequence[Any], builder_results: Sequence[Any],
              runner_results: Sequence[Any]) -> bool:
        """Commit and count one measured batch; True if tuning must stop (no device answers).

        Like MetaSchedule's AddToDatabase, failed candidates are stored as failed measurements
        (never used, never measured again), except where the *device* failed (over RPC): those
        are not stored, so a resumed run measures them."""
        st = self.state
        assert st is not None
        ok = failed = unavailable = 0
        for cand, b, r in zip(candidates, builder_results, runner_results, strict=True):
            run_secs = r.run_secs
            if b.error_msg:
                st.build_errors += 1
            elif r.error_msg:
                msg = str(r.error_msg)
                st.last_error = _reason(msg)
                if _WRONG in msg:
                    st.wrong += 1
                else:
                    st.errors += 1
                    failed += 1
                    if _UNAVAILABLE in msg or _LOST in msg:
                        unavailable += _UNAVAILABLE in msg
                        continue  # the device's fault, not the candidate's: not stored
            elif _mean(run_secs) is not None:
                ok += 1
                st.ok += 1
                t = _mean(run_secs)
                st.best = t if st.best is None else min(st.best, t)
            if run_secs is None:
                run_secs = [tvm.tirx.FloatImm("float32", 1e10)]
            self.database.commit_tuning_record(ms.database.TuningRecord(
                cand.sch.trace, self.workload, run_secs, self.target, cand.args_info))
        self.failed_batches = self.failed_batches + 1 if ok == 0 and failed else 0
        if self.bar is not None:
            self.bar.update(len(runner_results))
            post = {"best_ms": f"{st.best * 1e3:.4g}" if st.best is not None else "-"}
            if st.wrong:
                post["wrong"] = st.wrong
            if st.errors:
                post["errors"] = st.errors
            self.bar.set_postfix(post, refresh=True)
        if ok == 0 and unavailable:
            self.abort = st.last_error
        elif self.failed_batches >= 2:
            self.abort = f"two batches in a row failed to run ({st.last_error})"
        return self.abort is not None


@derived_object
class _Callback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, tracker: _Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
              runner_results: Any) -> None:
        if self.tracker.batch(list(measure_candidates), list(builder_results), list(runner_results)):
            # MetaSchedule's loop has no clean stop from a callback (terminate_task here trips its
            # checks): raise through it; this batch is already in the database
            raise DeviceLost(self.tracker.abort)


def _callbacks(tracker: _Tracker) -> list[Any]:
    """MetaSchedule's default callbacks, with ours in place of AddToDatabase (it commits)."""
    default = ms.measure_callback.MeasureCallback.create("default")
    return [_Callback(tracker), *(c for c in default if type(c).__name__ != "AddToDatabase")]


# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class TaskReport:
    """One task after tuning. Times in ms; ``kept``: what ``compile`` will use (``tuned``: the best
    search record, ``default``: the default schedule's record won, ``-``: nothing in the database)."""

    name: str
    origin: str
    weight: int
    mflops: float
    budget: int
    trials_before: int
    trials_run: int = 0
    best_ms: float | None = None
    default_ms: float | None = None
    kept: str = "-"
    wrong_results: int = 0
    errors: int = 0
    note: str = ""

    @property
    def trials(self) -> int:
        return self.trials_before + self.trials_run


@dataclass
class TuneReport:
    """What :func:`tune` did; :meth:`table` prints it."""

    target: str
    database: str
    cost_model: str
    device: str
    trials: int
    tasks: list[TaskReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    error: str | None = None

    @property
    def trials_run(self) -> int:
        return sum(t.trials_run for t in self.tasks)

    @property
    def wrong_results(self) -> int:
        return sum(t.wrong_results for t in self.tasks)

    def table(self) -> str:
        def ms_(v: float | None) -> str:
            return f"{v:.4g}" if v is not None else "-"

        rows = [("task", "kind", "calls", "MFLOP", "trials", "new", "best ms", "default ms", "kept", "wrong")]
        for t in self.tasks:
            rows.append((t.name, t.origin, str(t.weight), f"{t.mflops:.3g}", f"{t.trials}/{t.budget}",
                         str(t.trials_run), ms_(t.best_ms), ms_(t.default_ms), t.kept, str(t.wrong_results)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"target {self.target}; {self.device}; cost model: {self.cost_model}; "
                 f"database {self.database}"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in
                                   enumerate(zip(r, widths, strict=True))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        for t in self.tasks:
            if t.note:
                lines.append(f"- {t.name}: {t.note}")
        if self.skipped:
            names = ", ".join(f"{n} ({why})" for n, why in self.skipped)
            lines.append(f"not tuned (default schedules): {names}")
        status = "interrupted; " if self.interrupted else ""
        lines.append(f"{status}{self.trials_run} new trials in {self.seconds:.0f} s; "
                     f"{sum(t.trials for t in self.tasks)} in the database for these tasks")
        if self.wrong_results:
            lines.append(f"WARNING: {self.wrong_results} candidates returned wrong results on the device; "
                         "they are stored as failed measurements and never used")
        if self.error:
            lines.append(f"stopped: {self.error}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# the entry point


def _cost_model(choice: str) -> tuple[str, str]:
    """(MetaSchedule cost model name, description for the report)."""
    if choice not in COST_MODELS:
        raise TuneError(f"unknown cost model {choice!r}; expected one of {', '.join(COST_MODELS)}")
    try:
        import xgboost  # noqa: F401

        have = True
    except ImportError:
        have = False
    if choice == "xgb" and not have:
        raise TuneError("cost model 'xgb' needs xgboost (pip install xgboost-cpu); "
                        "or use --cost-model random")
    if choice == "random" or not have:
        why = "" if choice == "random" else " (xgboost is not installed; pip install xgboost-cpu for XGBoost)"
        return "random", "random" + why
    return "xgb", "XGBoost"


def _import_tensor_intrin() -> None:
    """``import tvm.s_tir.tensor_intrin`` (``TuneContext`` does it) in ~3 s instead of 30-80.

    Its TVMScript parser calls ``inspect.stack()`` hundreds of times; for every frame without a
    module file (importlib's frozen frames) ``inspect.getmodule`` scans all of ``sys.modules``
    (thousands with torch loaded). Remembering those misses for the import makes it fast.
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original, misses = inspect.getmodule, set()

    def getmodule(obj: Any, _filename: str | None = None) -> Any:
        if _filename is not None and _filename in misses:
            return None
        found = original(obj, _filename)
        if found is None and _filename is not None:
            misses.add(_filename)
        return found

    inspect.getmodule = getmodule
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.getmodule = original


def _tuning_target(tgt: tvm.target.Target, cores: int) -> tvm.target.Target:
    """MetaSchedule needs ``num-cores`` in a CPU target."""
    if tgt.kind.name == "llvm" and "num-cores" not in tgt.attrs:
        spec = {k: v for k, v in tgt.export().items() if k not in ("host", "keys", "tag")
                and not k.startswith("feature.")}
        spec["num-cores"] = cores
        return tvm.target.Target(spec)
    return tgt


def _device_check(rpc: tuple[str, int], key: str) -> tuple[int, int]:
    """(servers registered for ``key``, the device's thread count): fails early and clearly."""
    from .rpc import DeviceUnavailable, count_servers, request_session, tracker_summary

    try:
        servers = count_servers(tracker_summary(*rpc), key)
        session = request_session(*rpc, key, timeout=60)
        threads = int(session.get_function("runtime.NumThreads")())
    except DeviceUnavailable as exc:
        raise TuneError(str(exc)) from None
    return servers, threads


def _loggers(directory: Path) -> tuple[logging.Logger, list[tuple[logging.Logger, logging.Handler, bool]]]:
    """MetaSchedule's log lines go to ``<db>/logs/`` instead of the console."""
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(directory / "logs" / "tune.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s %(message)s"))
    undo = []
    for name in ("tvm.s_tir.meta_schedule", "dcgraph.tune"):
        lg = logging.getLogger(name)
        undo.append((lg, handler, lg.propagate))
        lg.addHandler(handler)
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    return logging.getLogger("dcgraph.tune"), undo


def tune(
    model: Any, target: Any = "x86", example_inputs: Any = None, *, trials: int,
    db: str | os.PathLike, rpc: str | None = None, key: str | None = None, cost_model: str = "auto",
    progress: bool = True, convert: bool = True, plan: str = "auto", fuse_plain: bool = True,
    shape: dict | None = None, min_trials: int = MIN_TRIALS, skip_share: float = SKIP_SHARE,
    kernels: Sequence[str] | None = None, timeout: float | None = None,
) -> TuneReport:
    """Tune ``model``'s kernels for ``target``, ``trials`` trials in all; records in ``db/<target key>/``.

    ``model``/``example_inputs``/``convert``/``plan``/``fuse_plain``/``shape``: as for
    :func:`.compiler.compile` (an ``IRModule`` is taken as is). ``rpc="host:port"`` and ``key``:
    measure on the devices of ``key`` registered with that TVM RPC tracker (builds stay here).
    ``cost_model``: ``auto`` (XGBoost if installed, else random), ``xgb`` or ``random``.
    ``kernels``: tune only the tasks of these names (the table of a first run lists them); the
    budget then goes to them alone. ``min_trials``/``skip_share``: see the module docstring.
    ``timeout``: seconds per measurement (default 60 here, 300 over RPC).

    Returns a :class:`TuneReport` (``interrupted=True`` after Ctrl-C: the records measured so far
    are kept). Raises :class:`TuneError` when no device answers; its ``report`` is the partial one.
    """
    from .compiler import prepare
    from .pipeline import fuse

    t0 = time.monotonic()
    if trials < 0:
        raise TuneError(f"trials must be >= 0, got {trials}")
    tgt = targets_.resolve(target)
    if tgt.kind.name != "llvm":
        raise TuneError(f"tuning supports CPU (llvm) targets, here or over RPC; not {targets_.describe(tgt)}")
    if (rpc is None) != (key is None):
        raise TuneError("--rpc HOST:PORT and --key NAME go together (the tracker and the device key)")
    if rpc is None and not targets_.runs_here(tgt):
        raise TuneError(f"{targets_.describe(tgt)} code does not run on this machine: measure it on a "
                        "device with rpc='host:port' and key (e.g. the emulated ARM server registered "
                        "with a tracker)")
    model_name, model_note = _cost_model(cost_model)
    rpc_addr: tuple[str, int] | None = None
    if rpc is not None:
        from .rpc import parse_address

        rpc_addr = parse_address(rpc)
        servers, threads = _device_check(rpc_addr, key)
        device = f"RPC tracker {rpc} key {key!r} ({servers} device{'s' * (servers != 1)})"
        workers = max(1, min(servers, 16))
    else:
        threads = os.cpu_count() or 1
        device = "this machine"
        workers = 1
    tuning_tgt = _tuning_target(tgt, threads)

    mod = prepare(model, example_inputs, plan=plan, convert=convert, fuse_plain=fuse_plain, shape=shape)
    fused = fuse(mod, tgt)
    tasks = extract_tasks(fused, tuning_tgt)
    directory = database_dir(db, tgt)
    database = open_database(db, tgt, create=True)
    (directory / "target.json").write_text(
        json.dumps({"key": directory.name, "target": str(tuning_tgt)}) + "\n")

    total_cost = sum(t.cost for t in tasks) or 1.0
    report = TuneReport(targets_.describe(tgt), str(directory), model_note, device, trials)
    if kernels is not None:
        unknown = sorted(set(kernels) - {t.name for t in tasks})
        if unknown:
            raise TuneError(f"no kernel named {', '.join(unknown)} in this model; its kernels: "
                            f"{', '.join(t.name for t in tasks)}")
    eligible = []
    for t in tasks:
        if kernels is not None:
            if t.name in kernels:
                eligible.append(t)
            else:
                report.skipped.append((t.name, "not selected"))
        elif t.cost <= 0 or t.cost / total_cost < skip_share:
            report.skipped.append((t.name, f"{100 * t.cost / total_cost:.2g}% of FLOPs"))
        else:
            eligible.append(t)
    budgets = split_budget([t.cost for t in eligible], trials, min_trials)
    plan_ = []
    for t, b in zip(eligible, budgets, strict=True):
        if b == 0:
            report.skipped.append((t.name, "budget"))
            continue
        workload = database.commit_workload(t.mod)
        plan_.append((t, b, workload))
        report.tasks.append(TaskReport(t.name, t.origin, t.weight, t.flops / 1e6, b,
                                       _search_trials(database, workload)))
    todo = sum(max(0, r.budget - r.trials_before) for r in report.tasks)

    tools = _Tools(tgt, tuning_tgt, (*rpc_addr, key) if rpc_addr else None, workers,
                   timeout or (300.0 if rpc else 60.0), model_name)
    task_log, undo = _loggers(directory)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=todo, unit="trial", desc="tuning", dynamic_ncols=True)
    tracker = _Tracker(bar, database)
    scratch = Path(tempfile.mkdtemp(prefix="dcgraph-tune-"))
    sigint = _Sigint()
    try:
        for (task, budget, workload), rep in zip(plan_, report.tasks, strict=True):
            remaining = max(0, budget - rep.trials_before)
            st = tracker.state = _TaskState(task.name)
            tracker.workload, tracker.target = workload, tuning_tgt
            # the default schedule, once per database: measured and checked like a candidate
            default_s, rep.note = _measure_default(task, workload, database, tools, scratch)
            rep.default_ms = default_s * 1e3 if default_s is not None else None
            if remaining:
                if bar is not None:
                    bar.set_description(f"{task.name} ({rep.trials_before}+{remaining})")
                tools.reference(task, scratch)
                per_iter = min(remaining, max(8, min(32, budget // 4)))
                # MetaSchedule's 512 is for thousands of trials; on two cores its genetic search
                # then costs more than the measurements of a small budget
                strategy = ms.search_strategy.EvolutionarySearch(
                    population_size=min(POPULATION, max(64, 32 * per_iter)),
                    init_min_unmeasured=min(50, 4 * per_iter))
                _import_tensor_intrin()  # TuneContext imports it: done fast first
                ctx = ms.TuneContext(mod=task.mod, target=tuning_tgt, space_generator="post-order-apply",
                                     search_strategy=strategy, task_name=task.name, logger=task_log,
                                     num_threads=tools.ncpu)
                try:
                    ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(directory / "logs"),
                                  max_trials_global=remaining, max_trials_per_task=remaining,
                                  num_trials_per_iter=per_iter, builder=tools.builder, runner=tools.runner,
                                  database=database, cost_model=tools.cost_model,
                                  measure_callbacks=_callbacks(tracker),
                                  task_scheduler="round-robin")
                except Exception:  # an exception inside MetaSchedule's loop comes back as a RuntimeError
                    if tracker.abort is None or sigint.seen:
                        raise
                rep.trials_run = _search_trials(database, workload) - rep.trials_before
                if rep.trials_run < remaining and tracker.abort is None:
                    rep.note = _join(rep.note, f"the search stopped after {rep.trials_run} of {remaining} "
                                               "new trials (no new candidates in its space)")
            rep.wrong_results, rep.errors = st.wrong, st.errors + st.build_errors
            rep.best_ms, rep.kept = _best(database, workload)
            if tracker.abort is not None:
                break
    except KeyboardInterrupt:
        _interrupted(report, plan_, database)
    except Exception as exc:
        # Ctrl-C inside any TVM call (MetaSchedule's loop, a build) comes back as a RuntimeError
        if sigint.seen:
            _interrupted(report, plan_, database)
        elif isinstance(exc, DeviceLost):
            tracker.abort = str(exc)
        else:
            raise
    finally:
        sigint.restore()
        if bar is not None:
            bar.close()
        tools.close()
        for lg, handler, propagate in undo:
            lg.removeHandler(handler)
            lg.propagate = propagate
        undo[0][1].close()
        shutil.rmtree(scratch, ignore_errors=True)
        report.seconds = time.monotonic() - t0
    if tracker.abort is not None:
        report.error = tracker.abort
        raise TuneError(f"tuning stopped: {tracker.abort}; the {report.trials_run} trials measured before "
                        f"are kept in {directory}", report)
    return report


def _interrupted(report: TuneReport, plan: list, database: Any) -> None:
    """Fill the report from what the database holds after a Ctrl-C."""
    report.interrupted = True
    for (_, _, workload), rep in zip(plan, report.tasks, strict=True):
        rep.trials_run = _search_trials(database, workload) - rep.trials_before
        rep.best_ms, rep.kept = _best(database, workload)


class _Sigint:
    """Notes a Ctrl-C: raised inside MetaSchedule's C++ loop, a KeyboardInterrupt comes back out
    of it as a plain RuntimeError, and this tells the two apart."""

    def __init__(self) -> None:
        import signal
        import threading

        self.seen = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class DeviceLost(RuntimeError):
    """No device answered while measuring a default schedule."""


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


class _Tools:
    """Builder, runner and cost model, made on first use (a resumed run with nothing left to tune
    needs none of them and skips their ~10 s of worker start-up)."""

    def __init__(self, target: tvm.target.Target, tuning_target: tvm.target.Target,
                 rpc: tuple[str, int, str] | None, workers: int, timeout: float, cost_model: str) -> None:
        self.target, self.tuning_target = target, tuning_target
        self.rpc, self.workers, self.timeout, self.cost_model_name = rpc, workers, timeout, cost_model
        self.ncpu = os.cpu_count() or 1
        self._builder = self._runner = self._cost = None
        self._references: dict[str, str] = {}

    @property
    def builder(self) -> ms.builder.LocalBuilder:
        if self._builder is None:
            arm = targets_.is_arm(self.target) and not targets_.runs_here(self.target)
            self._builder = ms.builder.LocalBuilder(f_build=_build, f_export=_export_arm if arm else _export,
                                                    max_workers=self.ncpu, timeout_sec=120)
        return self._builder

    @property
    def runner(self) -> _Runner:
        if self._runner is None:
            evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20 if self.rpc else 50)
            self._runner = _Runner(self.rpc, self.workers, self.timeout, evaluator)
        return self._runner

    @property
    def cost_model(self) -> ms.cost_model.CostModel:
        if self._cost is None:
            self._cost = (ms.cost_model.CostModel.create("xgb", num_tuning_cores=self.ncpu)
                          if self.cost_model_name == "xgb" else ms.cost_model.CostModel.create("random"))
        return self._cost

    def reference(self, task: Task, scratch: Path) -> None:
        """Point the runner at ``task``'s reference outputs (computed once)."""
        if task.name not in self._references:
            self._references[task.name] = str(_reference(task, scratch))
        self.runner.reference = self._references[task.name]

    def close(self) -> None:
        if self._runner is not None:
            self._runner.shutdown()


def _is_search(rec: Any) -> bool:
    """A record of MetaSchedule's search (its trace samples), not the default schedule's."""
    return any(inst.kind.name.startswith("Sample") for inst in rec.trace.insts)


def _best(database: ms.database.Database, workload: Any) -> tuple[float | None, str]:
    """(best valid search record in ms, what compile will apply: "tuned", "default" or "-")."""
    best = None
    for rec in database.get_all_tuning_records():
        if rec.workload.same_as(workload) and _is_search(rec):
            t = _mean(rec.run_secs)
            if t is not None and (best is None or t < best):
                best = t
    top = database.get_top_k(workload, 1)
    kept = "-" if not top else ("tuned" if _is_search(top[0]) else "default")
    return (best * 1e3 if best is not None else None), kept


def _measure_default(task: Task, workload: Any, database: Any, tools: _Tools,
                     scratch: Path) -> tuple[float | None, str]:
    """(seconds, note) of the default schedule: from its record, else measured (built, checked and
    timed like a candidate) and committed, so that the database's best is never slower."""
    for rec in database.get_all_tuning_records():
        if rec.workload.same_as(workload) and not _is_search(rec):
            t = _mean(rec.run_secs)
            return t, "" if t is not None else "the default schedule failed on the device (see the log)"
    tools.reference(task, scratch)
    sch = _default_schedule(task.mod, tools.tuning_target)
    args_info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    (built,) = tools.builder.build([ms.builder.BuilderInput(sch.mod, tools.tuning_target)])
    if built.error_msg:
        return None, "the default schedule failed to build"
    try:
        (fut,) = tools.runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])
        res = fut.result()
    finally:
        shutil.rmtree(os.path.dirname(str(built.artifact_path)), ignore_errors=True)
    if res.error_msg:
        msg = str(res.error_msg)
        if _UNAVAILABLE in msg or _LOST in msg:
            raise DeviceLost(_reason(msg))
        run_secs = [1e10]  # stored as a failed measurement, like a failed candidate
        note = f"the default schedule failed: {_reason(msg)}"
    else:
        run_secs, note = [float(getattr(v, "value", v)) for v in res.run_secs], ""
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, [tvm.tirx.FloatImm("float32", v) for v in run_secs], tools.tuning_target,
        args_info))
    return _mean(run_secs), note
