"""The search over a default schedule's knobs: every candidate a variant of dcgraph's own schedule.

A kernel whose default rule has knobs (:data:`..schedules.TUNABLE`: the blocked conv's register
tile, the Winograd GEMM's tile, the depthwise row tile) is tuned on that rule's space
(:func:`..schedules.knob_space`, a few to a few dozen points) instead of MetaSchedule's generic
one: its default is the first record (measured by the loop), then the other points in the order
the space lists them (the default's neighbours first), as many as the task's trials allow. The
space is small enough to be measured whole within tens of trials, so there is no cost model to
train and nothing random: the same run measures the same candidates, and a resumed run measures
only the points it does not have yet (records are matched by their knob decisions).

Candidates are built like MetaSchedule's and measured in batches of :data:`BATCH`, each batch in
one worker with the default schedule: every candidate's outputs checked against the reference,
then all of them timed interleaved (:func:`.measure.compare`), so one batch's times are taken
under the same conditions and a slow spell of this shared machine does not crown a candidate.
:class:`.progress.Tracker` commits every one (a record's times are its rounds).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from ..schedules import decisions, knob_space, traced_candidate, traced_default
from .measure import compare
from .progress import Tracker
from .records import is_search

log = logging.getLogger("dcgraph.tune")

__all__ = ["BATCH", "search", "space_size"]

#: candidates built and measured together (timed interleaved with the default)
BATCH = 8
#: rounds of a batch's interleaved timing; each times every kernel once, a block of >= MIN_REPEAT_MS
ROUNDS = 3
MIN_REPEAT_MS = 20


def space_size(task: Any, target: Any) -> int:
    """Points of the task's knob space besides the default (0: its rule has no knobs)."""
    return max(0, len(knob_space(task.mod, target)[1]) - 1)


def search(task: Any, workload: Any, budget: int, database: Any, tools: Any, tracker: Tracker,
           deadline: float | None = None) -> tuple[int, str] | None:
    """Measure up to ``budget`` points of the task's knob space that the database lacks; returns
    ``(points measured now, note)``, or None if the task's rule has no knobs. Stops early at
    ``deadline`` (``time.monotonic()``) or when the tracker says so (no device answers)."""
    target = tools.tuning_target
    rule, points = knob_space(task.mod, target)
    if len(points) <= 1:
        return None
    have = {decisions(rec.trace) for rec in database.get_all_tuning_records()
            if rec.workload.same_as(workload) and is_search(rec)}
    todo = []
    for values in points[1:]:
        sch = traced_candidate(task.mod, target, values)
        if decisions(sch.trace) not in have:
            todo.append(sch)
    left = len(todo)
    todo = todo[:max(0, budget)]
    args_info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    done, note = 0, ""
    default = None
    try:
        for start in range(0, len(todo), BATCH):
            if deadline is not None and time.monotonic() > deadline:
                note = "its share of the time ran out"
                break
            batch = todo[start:start + BATCH]
            schedules = batch if default is not None else [traced_default(task.mod, target), *batch]
            built = tools.builder.build([ms.builder.BuilderInput(s.mod, target) for s in schedules])
            if default is None:
                default, built = built[0], built[1:]
            results = _measure(built, default, args_info, tools)
            for b in built:
                _remove(b)
            stop = tracker.batch([ms.MeasureCandidate(s, args_info) for s in batch], built, results)
            done += len(batch)
            if stop:
                break
    finally:
        if default is not None:
            _remove(default)
    if not note and done == left:
        note = f"{rule}: all {len(points)} points of its space measured"
    return done, note


def _remove(built: Any) -> None:
    if built.artifact_path:
        shutil.rmtree(os.path.dirname(str(built.artifact_path)), ignore_errors=True)


def _measure(built: list[Any], default: Any, args_info: Any, tools: Any) -> list[Any]:
    """Runner results for a batch: on this machine every candidate checked and then timed
    interleaved with the default (:func:`.measure.compare`, :data:`ROUNDS` rounds), so the
    candidates of a batch are measured under the same conditions; over RPC by the runner."""
    ok = [i for i, b in enumerate(built) if not b.error_msg]
    results: list[Any] = [ms.runner.RunnerResult(None, None)] * len(built)
    if tools.rpc is not None or default.error_msg:
        futures = tools.runner.run([ms.runner.RunnerInput(built[i].artifact_path, "cpu", args_info)
                                    for i in ok])
        for i, fut in zip(ok, futures, strict=True):
            results[i] = fut.result()
        return results
    job = {"artifacts": [str(default.artifact_path), *(str(built[i].artifact_path) for i in ok)],
           "device_type": "cpu", "args_info": [a.as_json() for a in args_info], "rounds": ROUNDS,
           "min_repeat_ms": MIN_REPEAT_MS, "ref": tools.runner.reference}
    try:
        got = tools.runner.pool.submit(compare, job).result()
    except Exception as exc:  # the worker died (a crashing candidate): measure them one by one
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        log.warning("interleaved measurement failed (%s); measuring one by one", lines[-1] if lines else exc)
        futures = tools.runner.run([ms.runner.RunnerInput(built[i].artifact_path, "cpu", args_info)
                                    for i in ok])
        for i, fut in zip(ok, futures, strict=True):
            results[i] = fut.result()
        return results
    for i, times in zip(ok, got[1:], strict=True):
        results[i] = (ms.runner.RunnerResult(None, times) if isinstance(times, str) else
                      ms.runner.RunnerResult([tvm.tirx.FloatImm("float32", t) for t in times], None))
    return results
