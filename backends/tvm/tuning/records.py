"""What a tuning database holds for a task: search records, the default schedule's record, the best.

A record of MetaSchedule's search has sampling steps in its trace; the default schedule's
(committed once per database by the loop, :func:`.loop.tune`) has none. A failed measurement is
stored with run time 1e10 s and never counts as a time.
"""

from __future__ import annotations

from typing import Any

from tvm.s_tir import meta_schedule as ms

__all__ = ["best_record", "is_search", "mean_seconds", "search_trials"]


def is_search(rec: Any) -> bool:
    """A record of MetaSchedule's search (its trace samples), not the default schedule's."""
    return any(inst.kind.name.startswith("Sample") for inst in rec.trace.insts)


def mean_seconds(run_secs: Any) -> float | None:
    vals = [float(getattr(v, "value", v)) for v in (run_secs or [])]
    vals = [v for v in vals if v < 1e9]
    return sum(vals) / len(vals) if vals else None


def search_trials(db: ms.database.Database, workload: Any) -> int:
    """How many search trials the database holds for ``workload`` (failed ones included).

    Every record of the workload but one default-schedule record: the search can measure a
    candidate whose trace has no sampling instruction (its population is seeded from the
    database's best records, the default's among them), and that is a trial too."""
    recs = [rec for rec in db.get_all_tuning_records() if rec.workload.same_as(workload)]
    return len(recs) - min(1, sum(1 for rec in recs if not is_search(rec)))


def best_record(database: ms.database.Database, workload: Any) -> tuple[float | None, str]:
    """(best valid search record in ms, what compile will apply: "tuned", "default" or "-")."""
    best = None
    for rec in database.get_all_tuning_records():
        if rec.workload.same_as(workload) and is_search(rec):
            t = mean_seconds(rec.run_secs)
            if t is not None and (best is None or t < best):
                best = t
    top = database.get_top_k(workload, 1)
    kept = "-" if not top else ("tuned" if is_search(top[0]) else "default")
    return (best * 1e3 if best is not None else None), kept

