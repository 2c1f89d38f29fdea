"""Tuning for ARM on executed instructions: deterministic, noise-free, no board.

``tune(model, "arm", x, db=DIR, cost="instructions")`` (``dcgraph tune --target arm --cost
instructions``) builds every point of each kernel's knob space (:func:`..schedules.knob_space`:
dcgraph's own schedule with its knobs set, the default first) for aarch64, counts the
instructions one call of each executes on the emulated CPU (:mod:`..remote.arm_count`, all
candidates of the model in one emulated process, each checked against the unscheduled kernel on
the same inputs first) and keeps the point with the fewest, unless it saves less than
:data:`MARGIN` (then the default). Each candidate becomes a record of the database (its "time"
is its count times 1 ns, a nominal scale: MetaSchedule orders records by it) and the choice
goes to ``choices.json`` as for a timed run, so ``compile(..., database=DIR)`` applies it.

Counts are reproducible, so there is nothing to confirm and a second run re-counts nothing
(kernels with a choice are skipped). What a count does not see (cache misses, issue width) is in
:mod:`..remote.arm_count`'s notes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms

from .. import targets as targets_
from ..database import database_dir, fingerprint, open_database, read_choices, workload_key, write_choice
from ..errors import TuneError
from ..schedules import knob_space, traced_candidate, traced_default
from .measure import fixed_inputs, mismatch, reference_outputs
from .report import TaskReport, TuneReport

__all__ = ["MARGIN", "NS_PER_INSTRUCTION", "tune_by_count"]

#: a candidate replaces the default only with at least this share fewer instructions
MARGIN = 0.01
#: the nominal time of one instruction in a record (MetaSchedule's records hold seconds)
NS_PER_INSTRUCTION = 1.0


def tune_by_count(tasks: list[Any], tgt: tvm.target.Target, db: Any, report: TuneReport, progress: bool,
                  counter: Any = None) -> TuneReport:
    """Count every knob-space point of ``tasks`` (from :func:`.tasks.extract_tasks`) on the
    emulated CPU and keep the fewest instructions per kernel (see the module doc)."""
    from ..remote.arm_count import Item, count, ensure_counter
    from ..remote.arm_server import cross_compiler

    if not targets_.is_arm(tgt):
        raise TuneError("cost='instructions' counts on emulated aarch64: use an ARM target (--target arm)")
    t0 = time.monotonic()
    counter = counter or ensure_counter()
    directory = database_dir(db, tgt)
    database = open_database(db, tgt, create=True)
    choices = read_choices(directory)
    plans = []
    for task in tasks:
        rule, points = knob_space(task.mod, tgt)
        key = workload_key(task.mod)
        tr = TaskReport(task.name, task.origin, task.weight, task.flops / 1e6, max(0, len(points)),
                        len(points) if choices.get(key, {}).get("cost") == "instructions" else 0)
        report.tasks.append(tr)
        if len(points) <= 1:
            tr.note = f"{rule or 'no rule'}: no knobs; default schedule"
            tr.budget = 0
        elif tr.trials_before:
            entry = choices[key]
            tr.kept, counted = entry["choice"], entry.get("instructions", {})
            if counted.get("default") and counted.get("chosen"):
                tr.default_ms = tr.confirmed_default_ms = counted["default"] / 1e6
                tr.best_ms = tr.confirmed_ms = counted.get("best", counted["chosen"]) / 1e6
                tr.confirmed_ms = counted["chosen"] / 1e6
            tr.note = "counted in an earlier run"
        else:
            plans.append((task, tr, key, points))
    items, owners = [], []
    with tempfile.TemporaryDirectory(prefix="dcgraph-count-tune-") as tmp:
        for ti, (task, _tr, _key, points) in enumerate(plans):
            args_info = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])]
            inputs = fixed_inputs(args_info)
            want = reference_outputs(task, inputs)
            for pi, values in enumerate(points):
                sch = traced_default(task.mod, tgt) if pi == 0 else traced_candidate(task.mod, tgt, values)
                path = Path(tmp) / f"t{ti}p{pi}.so"
                tvm.compile(sch.mod, target=tgt).export_library(str(path), fcompile=cross_compiler())
                items.append(Item(f"t{ti}p{pi}", "tvm_func", str(path), inputs))
                owners.append((ti, pi, sch, want[-1]))
        outputs: dict[str, np.ndarray] = {}
        bar = _bar(len(items), progress)
        try:
            counts = count(items, counter, calls=1, warmup=1, outputs=outputs,
                           progress=(lambda done, _n: bar.update(done - bar.n)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
    per_task: dict[int, list[tuple[int, float, Any]]] = {}
    for item, (ti, pi, sch, want) in zip(items, owners, strict=True):
        tr = plans[ti][1]
        got = outputs[item.name]
        if mismatch([got], [want]) is not None:
            tr.wrong_results += 1
            continue
        per_task.setdefault(ti, []).append((pi, counts[item.name].total, sch))
    for ti, (task, tr, key, _points) in enumerate(plans):
        found = per_task.get(ti, [])
        tr.trials_run = len(found)
        if not found:
            tr.note = "every candidate gave a wrong result"
            continue
        workload = database.commit_workload(task.mod)
        args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
        for _pi, total, sch in found:
            secs = tvm.tirx.FloatImm("float32", total * NS_PER_INSTRUCTION * 1e-9)
            database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [secs], tgt, args))
        default = next((c for c in found if c[0] == 0), None)
        best = min(found, key=lambda c: (c[1], c[0]))
        tr.best_ms, tr.default_ms = best[1] / 1e6, (default[1] / 1e6 if default else None)
        keep_default = default is not None and best[1] > default[1] * (1 - MARGIN)
        tr.kept = "default" if keep_default else "tuned"
        pick = default if keep_default else best
        tr.confirmed_ms, tr.confirmed_default_ms = pick[1] / 1e6, tr.default_ms
        counted = {"default": default[1] if default else None, "chosen": pick[1], "best": best[1]}
        entry = {"task": task.name, "choice": tr.kept, "cost": "instructions", "instructions": counted}
        if not keep_default:
            entry["trace"] = fingerprint(ms.database.TuningRecord(best[2].trace, workload, None, tgt, args))
        write_choice(directory, key, entry)
    report.seconds = time.monotonic() - t0
    return report


def _bar(total: int, progress: bool) -> Any:
    if not progress or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="counting candidates on emulated aarch64", unit="kernel")
