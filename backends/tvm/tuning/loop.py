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
from . import knob_search
from .confirm import confirm
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
    knobs: int = 0  # points of its default rule's knob space besides the default (0: MetaSchedule's space)


def tune(
    model: Any, target: Any = "x86", example_inputs: Any = None, *, trials: int | None = None,
    minutes: float | None = None, db: str | os.PathLike, rpc: str | None = None, key: str | None = None,
    cost_model: str = "auto",
    progress: bool = True, convert: bool = True, plan: str = "auto", fuse_plain: bool = True,
    shape: dict | None = None, min_trials: int = MIN_TRIALS, skip_share: float = SKIP_SHARE,
    kernels: Sequence[str] | None = None, timeout: float | None = None, layout: str = "auto",
    winograd: bool = True, search: str = "auto", cost: str = "time",
) -> TuneReport:
    """Tune ``model``'s kernels for ``target``, ``trials`` trials in all and/or ``minutes`` of
    wall time; records in ``db/<target key>/``.

    ``minutes``: the run stops taking new candidates when they are spent; each task gets a share
    of what is left when it starts, by its cost (FLOPs x calls). With ``minutes`` alone, every
    task's knob space is measured whole (MetaSchedule's tasks: :data:`MINUTES_TRIALS` each) as
    far as the time goes.

    ``model``/``example_inputs``/``convert``/``plan``/``fuse_plain``/``shape``/``layout``/``winograd``:
    as for ``compile`` (an ``IRModule`` is taken as is). ``rpc="host:port"`` and ``key``:
    measure on the devices of ``key`` registered with that TVM RPC tracker (builds stay here).
    ``cost_model``: ``auto`` (XGBoost if installed, else random), ``xgb`` or ``random``.
    ``kernels``: tune only the tasks of these names (the table of a first run lists them); the
    budget then goes to them alone. ``min_trials``/``skip_share``: see :mod:`.tasks`.
    ``timeout``: seconds per measurement (default 60 here, 300 over RPC). ``search``: ``auto``
    (the knob space of a kernel whose default rule has one, MetaSchedule's search for the others)
    or ``knobs`` (only the kernels with a knob space; the others keep their default schedules).
    ``cost``: ``time`` (measured) or ``instructions`` (ARM targets: every knob-space point counted
    on the emulated CPU, :mod:`.count_search`; deterministic, no budget needed, ``rpc`` unused).

    Returns a :class:`TuneReport` (``interrupted=True`` after Ctrl-C: the records measured so far
    are kept). Raises :class:`TuneError` when no device answers; its ``report`` is the partial one.
    """
    t0 = time.monotonic()
    if search not in ("auto", "knobs"):
        raise TuneError(f"search must be 'auto' or 'knobs', got {search!r}")
    if cost not in ("time", "instructions"):
        raise TuneError(f"cost must be 'time' or 'instructions', got {cost!r}")
    if cost == "instructions":
        return _tune_by_count(model, target, example_inputs, db, progress, convert, plan, fuse_plain, shape,
                              kernels, layout, winograd, t0)
    if trials is None and minutes is None:
        raise TuneError("give a budget: trials=N (per model) and/or minutes=M")
    if minutes is not None and not minutes > 0:
        raise TuneError(f"minutes must be > 0, got {minutes}")
    tgt, rpc_addr = _check_request(target, 0 if trials is None else trials, rpc, key)
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

    report = TuneReport(targets_.describe(tgt), str(directory), model_note, device,
                        trials if trials is not None else 0, minutes)
    jobs = _plan(tasks, kernels, skip_share, trials, min_trials, database, report, tuning_tgt, search)
    tools = Tools(tgt, tuning_tgt, (*rpc_addr, key) if rpc_addr else None, workers,
                  timeout or (300.0 if rpc else 60.0), model_name)
    deadline = t0 + minutes * 60 if minutes is not None else None
    _run(jobs, report, database, tools, directory, progress, deadline)
    report.seconds = time.monotonic() - t0
    if report.error is not None:
        raise TuneError(f"tuning stopped: {report.error}; the {report.trials_run} trials measured before "
                        f"are kept in {directory}", report)
    return report


def _tune_by_count(model: Any, target: Any, example_inputs: Any, db: Any, progress: bool, convert: bool,
                   plan: str, fuse_plain: bool, shape: dict | None, kernels: Sequence[str] | None,
                   layout: str, winograd: bool, t0: float) -> TuneReport:
    from .count_search import tune_by_count

    tgt = targets_.resolve(target)
    if not targets_.is_arm(tgt):
        raise TuneError(f"cost='instructions' counts on emulated aarch64; {targets_.describe(tgt)} is not "
                        "an ARM target (--target arm)")
    mod = prepare(model, example_inputs, plan=plan, convert=convert, fuse_plain=fuse_plain, shape=shape)
    tasks = extract_tasks(fuse(mod, tgt, layout, winograd), tgt)
    if kernels:
        select(tasks, kernels, 0.0)
        tasks = [t for t in tasks if t.name in set(kernels)]
    directory = database_dir(db, tgt)
    report = TuneReport(targets_.describe(tgt), str(directory), "none (instructions counted)",
                        "emulated aarch64 (qemu, instruction counts)", 0, unit="M instr")
    tune_by_count(tasks, tgt, db, report, progress)
    (directory / "target.json").write_text(json.dumps({"key": directory.name, "target": str(tgt)}) + "\n")
    report.seconds = time.monotonic() - t0
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


#: trials per MetaSchedule task when only ``minutes`` are given (the time stops it first)
MINUTES_TRIALS = 256


def _budgets(eligible: list[Task], sizes: list[int], trials: int | None, min_trials: int) -> list[int]:
    """Trials per task: :func:`.tasks.split_budget`, but a task with a knob space gets no more than
    the space's size and what it cannot use goes to the others (by cost again)."""
    if trials is None:
        return [n if n else MINUTES_TRIALS for n in sizes]
    capped: dict[int, int] = {}
    while True:
        free = [i for i in range(len(eligible)) if i not in capped]
        shares = split_budget([eligible[i].cost for i in free], trials - sum(capped.values()), min_trials)
        over = [(i, b) for i, b in zip(free, shares, strict=True) if sizes[i] and b > sizes[i]]
        if not over:
            out = [0] * len(eligible)
            for i, b in capped.items():
                out[i] = b
            for i, b in zip(free, shares, strict=True):
                out[i] = b
            return out
        for i, _ in over:
            capped[i] = sizes[i]


def _plan(tasks: list[Task], kernels: Sequence[str] | None, skip_share: float, trials: int | None,
          min_trials: int, database: Any, report: TuneReport, target: tvm.target.Target,
          search: str = "auto") -> list[_Job]:
    """The tasks to tune with their budgets (the others go to ``report.skipped``)."""
    eligible, report.skipped = select(tasks, kernels, skip_share)
    sizes = [knob_search.space_size(t, target) for t in eligible]
    if search == "knobs":
        report.skipped += [(t.name, "no knobs") for t, n in zip(eligible, sizes, strict=True) if not n]
        eligible, sizes = [t for t, n in zip(eligible, sizes, strict=True) if n], [n for n in sizes if n]
    jobs = []
    for task, budget, size in zip(eligible, _budgets(eligible, sizes, trials, min_trials), sizes,
                                  strict=True):
        if budget == 0:
            report.skipped.append((task.name, "budget"))
            continue
        workload = database.commit_workload(task.mod)
        rep = TaskReport(task.name, task.origin, task.weight, task.flops / 1e6, budget,
                         search_trials(database, workload))
        report.tasks.append(rep)
        jobs.append(_Job(task, budget, workload, rep, size))
    return jobs


def _run(jobs: list[_Job], report: TuneReport, database: Any, tools: Tools, directory: Path,
         progress: bool, deadline: float | None = None) -> None:
    """Tune every job in turn; fills ``report`` (``interrupted``, ``error``) instead of raising
    for Ctrl-C and a lost device."""
    todo = sum(max(0, j.budget - j.report.trials_before) for j in jobs)
    task_log, undo = redirect_logs(directory)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        if deadline is not None:  # a time budget: the bar counts its seconds
            total = max(1, round(deadline - time.monotonic()))
            bar = tqdm(total=total, unit="s", desc="tuning", dynamic_ncols=True)
        else:
            bar = tqdm(total=todo, unit="trial", desc="tuning", dynamic_ncols=True)
    tracker = Tracker(bar, database)
    if bar is not None and deadline is not None:
        tracker.clock = (time.monotonic(), bar.total)
    cost_left = sum(j.task.cost for j in jobs)
    scratch = Path(tempfile.mkdtemp(prefix="dcgraph-tune-"))
    sigint = SigintWatch()
    clean = False
    try:
        for job in jobs:
            until = None
            if deadline is not None:  # this task's share of the time left, by cost
                now = time.monotonic()
                if now >= deadline:
                    job.report.note = "not reached: the time ran out"
                    job.report.best_ms, job.report.kept = best_record(database, job.workload)
                    continue
                until = now + (deadline - now) * job.task.cost / max(cost_left, 1e-9)
            cost_left -= job.task.cost
            _tune_task(job, database, tools, tracker, scratch, directory, task_log, bar, sigint, until)
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


def _tune_task(job: _Job, database: Any, tools: Tools, tracker: Tracker, scratch: Path, directory: Path,
               task_log: Any, bar: Any, sigint: SigintWatch, until: float | None = None) -> None:
    """The default schedule's record (once per database), then the search for what is left (the
    default rule's knob space where it has one, else MetaSchedule's), then the confirmation of
    the best candidates against the current choice (:mod:`.confirm`, on this machine)."""
    task, rep = job.task, job.report
    remaining = max(0, job.budget - rep.trials_before)
    st = tracker.state = TaskState(task.name)
    tracker.workload, tracker.target, tracker.deadline = job.workload, tools.tuning_target, until
    default_s, rep.note = _measure_default(task, job.workload, database, tools, scratch)
    rep.default_ms = default_s * 1e3 if default_s is not None else None
    tracker.default = default_s
    if remaining and job.knobs:
        if bar is not None:
            bar.set_description(f"{task.name} ({rep.trials_before}+{remaining})")
        tools.reference(task, scratch)
        _, note = knob_search.search(task, job.workload, remaining, database, tools, tracker, until)
        rep.trials_run = search_trials(database, job.workload) - rep.trials_before
        rep.note = _join(rep.note, note)
    elif remaining:
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
            ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(directory / "logs"),
                          max_trials_global=remaining, max_trials_per_task=remaining,
                          num_trials_per_iter=per_iter, builder=tools.builder, runner=tools.runner,
                          database=database, cost_model=tools.cost_model,
                          measure_callbacks=callbacks(tracker), task_scheduler="round-robin")
        except Exception:  # an exception inside MetaSchedule's loop comes back as a RuntimeError
            if (tracker.abort is None and not tracker.out_of_time) or sigint.seen:
                raise
        rep.trials_run = search_trials(database, job.workload) - rep.trials_before
        if tracker.out_of_time:
            rep.note = _join(rep.note, "its share of the time ran out")
        elif rep.trials_run < remaining and tracker.abort is None:
            rep.note = _join(rep.note, f"the search stopped after {rep.trials_run} of {remaining} "
                                       "new trials (no new candidates in its space)")
    rep.wrong_results, rep.errors = st.wrong, st.errors + st.build_errors
    rep.best_ms, rep.kept = best_record(database, job.workload)
    if tools.rpc is None and tracker.abort is None and default_s is not None:
        choice = confirm(task, job.workload, database, tools, directory)
        rep.kept, rep.confirmed_ms, rep.confirmed_default_ms = (choice.kept, choice.chosen_ms,
                                                                 choice.default_ms)
        rep.note = _join(rep.note, choice.note)


def _interrupted(report: TuneReport, jobs: list[_Job], database: Any) -> None:
    """Fill the report from what the database holds after a Ctrl-C."""
    report.interrupted = True
    for job in jobs:
        job.report.trials_run = search_trials(database, job.workload) - job.report.trials_before
        job.report.best_ms, job.report.kept = best_record(database, job.workload)


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b


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
