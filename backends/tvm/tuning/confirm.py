"""Which schedule a kernel keeps: the fastest stored candidates re-measured against the current
choice, interleaved, before one replaces it.

A record's time is a few blocks of calls on a shared 2-core machine, taken at one moment (a knob
search's batch interleaved with the default, MetaSchedule's candidates one by one); a candidate
that read 10% faster may just have been measured in a quiet spell. So after a task's search, its
:data:`CHALLENGERS` fastest records are each timed against the current choice (the default the
first time) in one worker, :data:`ROUNDS` rounds alternating between the two
(:func:`.measure.compare`), and a challenger replaces the choice only when its median is at
least :data:`MARGIN` below. The choice and the confirmed medians go to ``choices.json``
(:mod:`..database`), which ``compile`` follows: a kernel whose default was not beaten keeps the
default schedule, so a tuned build is not slower than an untuned one, measured this way.

Over RPC nothing is confirmed (the devices are measured one candidate at a time): ``compile``
then applies the fastest stored record, as MetaSchedule does.
"""

from __future__ import annotations

import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from ..database import fingerprint, read_choices, workload_key, write_choice
from ..schedules import traced_default
from .measure import compare
from .records import is_search, mean_seconds

__all__ = ["CHALLENGERS", "MARGIN", "ROUNDS", "Choice", "confirm"]

#: the fastest stored candidates re-measured against the current choice
CHALLENGERS = 2
#: rounds of the interleaved comparison (each times both kernels once, >= 20 ms each)
ROUNDS = 7
#: a challenger must be this much faster (median) to replace the choice
MARGIN = 0.02
MIN_REPEAT_MS = 20


@dataclass
class Choice:
    """What ``compile`` will run for a task: ``kept`` "tuned" or "default", the confirmed medians
    (ms) of the choice and of the default (None if not re-measured), and a note."""

    kept: str
    chosen_ms: float | None = None
    default_ms: float | None = None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        if self.chosen_ms and self.default_ms:
            return self.default_ms / self.chosen_ms
        return None


def _schedule(task: Any, rec: Any | None, target: Any) -> Schedule:
    if rec is None:
        return traced_default(task.mod, target)
    sch = Schedule(task.mod)
    rec.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def _race(task: Any, schedules: list[Schedule], tools: Any) -> list[float]:
    """Median seconds per call of each schedule, timed interleaved in one worker."""
    target = tools.tuning_target
    built = tools.builder.build([ms.builder.BuilderInput(s.mod, target) for s in schedules])
    try:
        bad = next((b.error_msg for b in built if b.error_msg), None)
        if bad:
            raise RuntimeError(f"build failed: {str(bad).strip().splitlines()[-1]}")
        args_info = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])]
        job = {"artifacts": [str(b.artifact_path) for b in built], "device_type": "cpu",
               "args_info": args_info, "rounds": ROUNDS, "min_repeat_ms": MIN_REPEAT_MS}
        times = tools.runner.pool.submit(compare, job).result()
    finally:
        for b in built:
            if b.artifact_path:
                shutil.rmtree(os.path.dirname(str(b.artifact_path)), ignore_errors=True)
    return [statistics.median(t) for t in times]


def confirm(task: Any, workload: Any, database: Any, tools: Any, directory: Path) -> Choice:
    """Re-measure the task's best stored candidates against its current choice; record the winner."""
    recs = [r for r in database.get_all_tuning_records() if r.workload.same_as(workload)]
    prints: dict[int, str] = {}  # a fingerprint replays the trace: once per record

    def fingerprint_of(rec: Any) -> str:
        if id(rec) not in prints:
            prints[id(rec)] = fingerprint(rec)
        return prints[id(rec)]

    key = workload_key(task.mod)
    entry = read_choices(directory).get(key, {})
    current = None
    if entry.get("choice") == "tuned":
        current = next((r for r in recs if is_search(r) and fingerprint_of(r) == entry.get("trace")), None)
    timed = sorted(((mean_seconds(r.run_secs), r) for r in recs if is_search(r)),
                   key=lambda p: p[0] if p[0] is not None else float("inf"))
    taken = {fingerprint_of(current)} if current is not None else set()
    challengers = []
    for t, rec in timed:
        if t is None or len(challengers) == CHALLENGERS:
            break
        fp = fingerprint_of(rec)
        if fp not in taken:
            taken.add(fp)
            challengers.append(rec)
    raced = set(entry.get("raced", []))
    if challengers and all(fingerprint_of(r) in raced for r in challengers):  # nothing new since
        return Choice(entry.get("choice", "default"), entry.get("chosen_ms"), entry.get("default_ms"))
    if not challengers:
        kept = "tuned" if current is not None else "default"
        if not entry:
            write_choice(directory, key, {"task": task.name, "choice": "default",
                                          "note": "no candidate measured faster than the default"})
        return Choice(kept, entry.get("chosen_ms"), entry.get("default_ms"),
                      "" if current is not None or not timed else "no candidate beat the default")
    target = tools.tuning_target
    best, best_ms, default_ms = current, None, None
    for rec in challengers:
        incumbent_ms, challenger_ms = (v * 1e3 for v in _race(task, [_schedule(task, best, target),
                                                                     _schedule(task, rec, target)], tools))
        if best is None:
            default_ms = incumbent_ms
        if best_ms is None:
            best_ms = incumbent_ms
        if challenger_ms < incumbent_ms * (1 - MARGIN):
            best, best_ms = rec, challenger_ms
    if default_ms is None:  # the incumbent was a tuned record: the default's confirmed time stays
        default_ms = entry.get("default_ms")
    new = {"task": task.name, "choice": "tuned" if best is not None else "default",
           "chosen_ms": best_ms, "default_ms": default_ms, "rounds": ROUNDS, "margin": MARGIN,
           "raced": sorted(raced | {fingerprint_of(r) for r in challengers})}
    if best is not None:
        new["trace"] = fingerprint_of(best)
    write_choice(directory, key, new)
    return Choice(new["choice"], best_ms, default_ms)
