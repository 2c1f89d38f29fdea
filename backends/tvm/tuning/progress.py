"""Progress and failure tracking while MetaSchedule measures: records committed, counts per task,
the progress bar, and the decision to stop when no device answers.

:class:`Callback` replaces MetaSchedule's ``AddToDatabase`` callback: every measured batch goes
through :meth:`Tracker.batch`, which commits its records (failed candidates as failed
measurements, except where the *device* failed: those are not stored, so a resumed run
measures them) and raises :class:`DeviceLost` through MetaSchedule's loop when tuning must stop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .measure import LOST, UNAVAILABLE, WRONG, reason
from .records import mean_seconds

__all__ = ["Callback", "DeviceLost", "TaskState", "Tracker", "callbacks"]


class DeviceLost(RuntimeError):
    """No device answered: raised through MetaSchedule's loop (or while measuring a default schedule)."""


@dataclass
class TaskState:
    name: str
    best: float | None = None
    ok: int = 0
    wrong: int = 0
    errors: int = 0
    build_errors: int = 0
    last_error: str = ""


class Tracker:
    """The measure callback's state: commits the records, counts per task, decides to stop."""

    def __init__(self, bar: Any, database: Any) -> None:
        self.bar = bar
        self.database = database
        self.state: TaskState | None = None
        self.workload: Any = None
        self.target: tvm.target.Target | None = None
        self.failed_batches = 0
        self.abort: str | None = None
        self.deadline: float | None = None  # the current task's share of the time ends (monotonic)
        self.out_of_time = False  # set when a batch ends past the deadline: the search stops
        self.default: float | None = None  # the current task's default schedule, seconds
        self.clock: tuple[float, float] | None = None  # (start, seconds) when the bar counts time

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
                st.last_error = reason(msg)
                if WRONG in msg:
                    st.wrong += 1
                else:
                    st.errors += 1
                    failed += 1
                    if UNAVAILABLE in msg or LOST in msg:
                        unavailable += UNAVAILABLE in msg
                        continue  # the device's fault, not the candidate's: not stored
            elif mean_seconds(run_secs) is not None:
                ok += 1
                st.ok += 1
                t = mean_seconds(run_secs)
                st.best = t if st.best is None else min(st.best, t)
            if run_secs is None:
                run_secs = [tvm.tirx.FloatImm("float32", 1e10)]
            self.database.commit_tuning_record(ms.database.TuningRecord(
                cand.sch.trace, self.workload, run_secs, self.target, cand.args_info))
        self.failed_batches = self.failed_batches + 1 if ok == 0 and failed else 0
        if self.bar is not None:
            if self.clock is not None:  # a time budget: the bar counts seconds, its ETA is the deadline
                start, total = self.clock
                self.bar.update(max(0, min(total, round(time.monotonic() - start)) - self.bar.n))
            else:
                self.bar.update(len(runner_results))
            post = {"best_ms": f"{st.best * 1e3:.4g}" if st.best is not None else "-"}
            if st.best is not None and self.default:
                post["speedup"] = f"{self.default / st.best:.2f}x"
            if st.wrong:
                post["wrong"] = st.wrong
            if st.errors:
                post["errors"] = st.errors
            self.bar.set_postfix(post, refresh=True)
        if ok == 0 and unavailable:
            self.abort = st.last_error
        elif self.failed_batches >= 2:
            self.abort = f"two batches in a row failed to run ({st.last_error})"
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.out_of_time = True
        return self.abort is not None or self.out_of_time


@derived_object
class Callback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
              runner_results: Any) -> None:
        if self.tracker.batch(list(measure_candidates), list(builder_results), list(runner_results)):
            # MetaSchedule's loop has no clean stop from a callback (terminate_task here trips its
            # checks): raise through it; this batch is already in the database
            raise DeviceLost(self.tracker.abort or "out of time")


def callbacks(tracker: Tracker) -> list[Any]:
    """MetaSchedule's default callbacks, with ours in place of AddToDatabase (it commits)."""
    default = ms.measure_callback.MeasureCallback.create("default")
    return [Callback(tracker), *(c for c in default if type(c).__name__ != "AddToDatabase")]

