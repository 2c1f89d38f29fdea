"""Tuning tasks and budgets: a fused module's kernels as MetaSchedule workloads, trials spread by cost.

Structurally equal kernels are one task; its weight is how often the model calls it. Cost of a
task = FLOPs per call x weight (``estimate_tir_flops``). :func:`select` leaves out tasks under
:data:`SKIP_SHARE` of the model's cost (reshapes, pooling, the tiny hoisted-mean kernels of small
layers) and :func:`split_budget` gives every other task at least :data:`MIN_TRIALS`, the rest
by cost (largest remainder); when the total cannot give every task its minimum, the costliest
get it and the others are skipped ("budget").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import tvm
from tvm.s_tir import meta_schedule as ms

from ..errors import TuneError
from ..lowering import kernel_origin

__all__ = ["MIN_TRIALS", "SKIP_SHARE", "Task", "extract_tasks", "select", "split_budget"]

#: every tuned task gets at least this many trials (fewer are mostly random samples)
MIN_TRIALS = 8

#: tasks under this share of the model's FLOPs keep the default schedule
SKIP_SHARE = 0.01



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
        origin = kernel_origin(str(t.task_name), attrs)
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



def select(tasks: Sequence[Task], kernels: Sequence[str] | None, skip_share: float
           ) -> tuple[list[Task], list[tuple[str, str]]]:
    """(tasks to tune, [(name, why not)] for the others): the ones named in ``kernels`` (all
    of them must exist), else every task with at least ``skip_share`` of the model's FLOPs."""
    if kernels is not None:
        unknown = sorted(set(kernels) - {t.name for t in tasks})
        if unknown:
            raise TuneError(f"no kernel named {', '.join(unknown)} in this model; its kernels: "
                            f"{', '.join(t.name for t in tasks)}")
    total = sum(t.cost for t in tasks) or 1.0
    eligible, skipped = [], []
    for t in tasks:
        if kernels is not None:
            if t.name in kernels:
                eligible.append(t)
            else:
                skipped.append((t.name, "not selected"))
        elif t.cost <= 0 or t.cost / total < skip_share:
            skipped.append((t.name, f"{100 * t.cost / total:.2g}% of FLOPs"))
        else:
            eligible.append(t)
    return eligible, skipped
