"""The tuning loop: :func:`tune` imports a model as ``compile`` does, tunes its kernels one after
another and stores every measured candidate in ``DB/<target key>/`` (see the package docstring
for the whole story: tasks, budget, resume, baseline, search, checking).

Per task: the default schedule (:func:`.schedules.traced_default`, what ``compile`` runs without
a record) is measured once per database and committed as a record, so the database's best is
never slower than it; then ``ms.tune_tasks`` spends what is left of the task's share. Ctrl-C and
a lost device stop the run with every measured record kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from .. import targets as targets_
from ..database import database_dir, open_database
from ..errors import TuneError
from ..frontends import prepare
from ..pipeline import fuse
from ..schedules import traced_default
from .measure import LOST, UNAVAILABLE, reason
from .postprocs import with_sound_reductions
from .progress import DeviceLost, TaskState, Tracker, callbacks
from .records import best_record, is_search, mean_seconds, search_trials
from .report import TaskReport, TuneReport
from .tasks import MIN_TRIALS, SKIP_SHARE, Task, extract_tasks, select, split_budget
from .tools import (
    POPULATION,
    SigintWatch,
    Tools,
    cost_model_choice,
    device_check,
    import_tensor_intrin,
    redirect_logs,
    tuning_target,
)

__all__ = ["tune"]


@dataclass
class _Job:
    """One task of the run: what to tune, its share of the trials, its database workload."""

    task: Task
    budget: int
    workload: Any
    report: TaskReport


def tune(
    model: Any, target: Any = "x86", example_inputs: Any = None, *, trials: int,
    db: str | os.PathLike, rpc: str | None = None, key: str | None = None, cost_model: str = "auto",
    progress: bool = True, convert: bool = True, plan: str = "auto", fuse_plain: bool = True,
    shape: dict | None = None, min_trials: int = MIN_TRIALS, skip_share: float = SKIP_SHARE,
    kernels: Sequence[str] | None = None, timeout: float | None = None, layout: str = "auto",
    winograd: bool = True,
) -> TuneReport:
    """Tune ``model``'s kernels for ``target``, ``trials`` trials in all; records in ``db/<target key>/``.

    ``model``/``example_inputs``/``convert``/``plan``/``fuse_plain``/``shape``/``layout``/``winograd``:
    as for ``compile`` (an ``IRModule`` is taken as is). ``rpc="host:port"`` and ``key``:
    measure on the devices of ``key`` registered with that TVM RPC tracker (builds stay here).
    ``cost_model``: ``auto`` (XGBoost if installed, else random), ``xgb`` or ``random``.
    ``kernels``: tune only the tasks of these names (the table of a first run lists them); the
    budget then goes to them alone. ``min_trials``/``skip_share``: see :mod:`.tasks`.
    ``timeout``: seconds per measurement (default 60 here, 300 over RPC).

    Returns a :class:`TuneReport` (``interrupted=True`` after Ctrl-C: the records measured so far
    are kept). Raises :class:`TuneError` when no device answers; its ``report`` is the partial one.
    """
    t0 = time.monotonic()
    tgt, rpc_addr = _check_request(target, trials, rpc, key)
    model_name, model_note = cost_model_choice(cost_model)
    if rpc_addr is not None:
        servers, threads = device_check(rpc_addr, key)
        device = f"RPC tracker {rpc} key {key!r} ({servers} device{'s' * (servers != 1)})"
        workers = max(1, min(servers, 16))
    else:
        threads, device, workers = os.cpu_count() or 1, "this machine", 1
    tuning_tgt = tuning_target(tgt, threads)

    mod = prepare(model, example_inputs, plan=plan, convert=convert, fuse_plain=fuse_plain, shape=shape)
    tasks = extract_tasks(fuse(mod, tgt, layout, winograd), tuning_tgt)
    select(tasks, kernels, skip_share)  # an unknown kernel name fails here, before the database is made
    directory = database_dir(db, tgt)
    database = open_database(db, tgt, create=True)
    (directory / "target.json").write_text(
        json.dumps({"key": directory.name, "target": str(tuning_tgt)}) + "\n")

    report = TuneReport(targets_.describe(tgt), str(directory), model_note, device, trials)
    jobs = _plan(tasks, kernels, skip_share, trials, min_trials, database, report)
    tools = Tools(tgt, tuning_tgt, (*rpc_addr, key) if rpc_addr else None, workers,
                  timeout or (300.0 if rpc else 60.0), model_name)
    _run(jobs, report, database, tools, directory, progress)
    report.seconds = time.monotonic() - t0
    if report.error is not None:
        raise TuneError(f"tuning stopped: {report.error}; the {report.trials_run} trials measured before "
                        f"are kept in {directory}", report)
    return report


def _check_request(target: Any, trials: int, rpc: str | None, key: str | None
                   ) -> tuple[tvm.target.Target, tuple[str, int] | None]:
    """The resolved target and tracker address, or a :class:`TuneError` saying what does not fit."""
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
    if rpc is None:
        return tgt, None
    from ..remote.rpc import parse_address

    return tgt, parse_address(rpc)


def _plan(tasks: list[Task], kernels: Sequence[str] | None, skip_share: float, trials: int,
          min_trials: int, database: Any, report: TuneReport) -> list[_Job]:
    """The tasks to tune with their budgets (the others go to ``report.skipped``)."""
    eligible, report.skipped = select(tasks, kernels, skip_share)
    jobs = []
    for task, budget in zip(eligible, split_budget([t.cost for t in eligible], trials, min_trials),
                            strict=True):
        if budget == 0:
            report.skipped.append((task.name, "budget"))
            continue
        workload = database.commit_workload(task.mod)
        rep = TaskReport(task.name, task.origin, task.weight, task.flops / 1e6, budget,
                         search_trials(database, workload))
        report.tasks.append(rep)
        jobs.append(_Job(task, budget, workload, rep))
    return jobs


def _run(jobs: list[_Job], report: TuneReport, database: Any, tools: Tools, directory: Path,
         progress: bool) -> None:
    """Tune every job in turn; fills ``report`` (``interrupted``, ``error``) instead of raising
    for Ctrl-C and a lost device."""
    todo = sum(max(0, j.budget - j.report.trials_before) for j in jobs)
    task_log, undo = redirect_logs(directory)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=todo, unit="trial", desc="tuning", dynamic_ncols=True)
    tracker = Tracker(bar, database)
    scratch = Path(tempfile.mkdtemp(prefix="dcgraph-tune-"))
    sigint = SigintWatch()
    clean = False
    try:
        for job in jobs:
            _tune_task(job, database, tools, tracker, scratch, directory / "logs", task_log, bar, sigint)
            if tracker.abort is not None:
                break
        clean = tracker.abort is None
    except KeyboardInterrupt:
        _interrupted(report, jobs, database)
    except Exception as exc:
        # Ctrl-C inside any TVM call (MetaSchedule's loop, a build) comes back as a RuntimeError
        if sigint.seen:
            _interrupted(report, jobs, database)
        elif isinstance(exc, DeviceLost):
            tracker.abort = str(exc)
        else:
            raise
    finally:
        sigint.restore()
        if bar is not None:
            bar.close()
        tools.close(keep=clean)
        for lg, handler, propagate in undo:
            lg.removeHandler(handler)
            lg.propagate = propagate
        undo[0][1].close()
        shutil.rmtree(scratch, ignore_errors=True)
    report.error = tracker.abort


def _tune_task(job: _Job, database: Any, tools: Tools, tracker: Tracker, scratch: Path, logs: Path,
               task_log: Any, bar: Any, sigint: SigintWatch) -> None:
    """The default schedule's record (once per database), then the search for what is left."""
    task, rep = job.task, job.report
    remaining = max(0, job.budget - rep.trials_before)
    st = tracker.state = TaskState(task.name)
    tracker.workload, tracker.target = job.workload, tools.tuning_target
    default_s, rep.note = _measure_default(task, job.workload, database, tools, scratch)
    rep.default_ms = default_s * 1e3 if default_s is not None else None
    if remaining:
        if bar is not None:
            bar.set_description(f"{task.name} ({rep.trials_before}+{remaining})")
        tools.reference(task, scratch)
        per_iter = min(remaining, max(8, min(32, job.budget // 4)))
        # MetaSchedule's 512 is for thousands of trials; on two cores its genetic search
        # then costs more than the measurements of a small budget
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=min(POPULATION, max(64, 32 * per_iter)),
            init_min_unmeasured=min(50, 4 * per_iter))
        import_tensor_intrin()  # TuneContext imports it: done fast first
        ctx = ms.TuneContext(mod=task.mod, target=tools.tuning_target,
                             space_generator=with_sound_reductions(task.mod, tools.tuning_target),
                             search_strategy=strategy, task_name=task.name, logger=task_log,
                             num_threads=tools.ncpu)
        try:
            ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(logs),
                          max_trials_global=remaining, max_trials_per_task=remaining,
                          num_trials_per_iter=per_iter, builder=tools.builder, runner=tools.runner,
                          database=database, cost_model=tools.cost_model,
                          measure_callbacks=callbacks(tracker), task_scheduler="round-robin")
        except Exception:  # an exception inside MetaSchedule's loop comes back as a RuntimeError
            if tracker.abort is None or sigint.seen:
                raise
        rep.trials_run = search_trials(database, job.workload) - rep.trials_before
        if rep.trials_run < remaining and tracker.abort is None:
            rep.note = _join(rep.note, f"the search stopped after {rep.trials_run} of {remaining} "
                                       "new trials (no new candidates in its space)")
    rep.wrong_results, rep.errors = st.wrong, st.errors + st.build_errors
    rep.best_ms, rep.kept = best_record(database, job.workload)


def _interrupted(report: TuneReport, jobs: list[_Job], database: Any) -> None:
    """Fill the report from what the database holds after a Ctrl-C."""
    report.interrupted = True
    for job in jobs:
        job.report.trials_run = search_trials(database, job.workload) - job.report.trials_before
        job.report.best_ms, job.report.kept = best_record(database, job.workload)


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _measure_default(task: Task, workload: Any, database: Any, tools: Tools,
                     scratch: Path) -> tuple[float | None, str]:
    """(seconds, note) of the default schedule: from its record, else measured (built, checked and
    timed like a candidate) and committed, so that the database's best is never slower."""
    for rec in database.get_all_tuning_records():
        if rec.workload.same_as(workload) and not is_search(rec):
            t = mean_seconds(rec.run_secs)
            return t, "" if t is not None else "the default schedule failed on the device (see the log)"
    tools.reference(task, scratch)
    sch = traced_default(task.mod, tools.tuning_target)
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
        if UNAVAILABLE in msg or LOST in msg:
            raise DeviceLost(reason(msg))
        run_secs = [1e10]  # stored as a failed measurement, like a failed candidate
        note = f"the default schedule failed: {reason(msg)}"
    else:
        run_secs, note = [float(getattr(v, "value", v)) for v in res.run_secs], ""
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, [tvm.tirx.FloatImm("float32", v) for v in run_secs], tools.tuning_target,
        args_info))
    return mean_seconds(run_secs), note
