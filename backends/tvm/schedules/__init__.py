"""Default (untuned) schedules: the rules every PrimFunc gets when no tuning record matches.

One list per target family, used by both ``compile`` (:class:`DefaultSchedule`, in the
pipeline) and ``tune`` (:func:`traced_default`, the baseline record every search starts
against), so the two cannot drift apart:

- CPU (:mod:`.cpu`): :data:`.cpu.CPU_RULES`, ``conv`` (register-tiled direct convolution with
  the Deep Control epilogue on the tile), ``two_pass`` (map sum + epilogue per channel while in
  cache), ``parallel`` (vectorised hoisted-shift reductions, parallel outer loops);
- GPU (:mod:`.gpu`): a conv rule, a rule for the hoisted shift's reductions, then dlight.

:mod:`.common` holds what the rules share (the conv block finder, the schedule marks).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from ..targets import is_gpu
from .common import IS_SCHEDULED, SCHEDULED, conv_stages, find_conv_block, is_tuned
from .cpu import CPU_RULES, TUNABLE, apply_cpu_rules, schedule_func_cpu, vector_lanes
from .knobs import Fixed, decisions, space

__all__ = ["CPU_RULES", "IS_SCHEDULED", "SCHEDULED", "TUNABLE", "DefaultSchedule", "apply_cpu_rules",
           "conv_stages", "decisions", "find_conv_block", "is_tuned", "knob_space", "schedule_func_cpu",
           "traced_candidate", "traced_default", "vector_lanes"]


@tvm.transform.module_pass(opt_level=0, name="dcgraph.DefaultSchedule")
class DefaultSchedule:
    """Schedule every PrimFunc of the module that no record and no earlier rule scheduled."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if is_gpu(self.target):
            from . import gpu

            return gpu.default_schedule(mod, self.target)
        lanes = vector_lanes(self.target)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or SCHEDULED in (func.attrs or {}) or is_tuned(func):
                continue
            new = schedule_func_cpu(func, lanes)
            if new is not None:
                updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def traced_default(mod: tvm.IRModule, target: tvm.target.Target) -> Schedule:
    """What ``compile`` gives a CPU kernel (``{"main": PrimFunc}``) without a record, as a traced
    schedule for a tuning database; an unscheduled one where no rule applies (with one no-op step:
    a database ignores records with an empty trace)."""
    found = apply_cpu_rules(mod, vector_lanes(target))
    if found is not None:
        return found[1]
    sch = Schedule(mod)
    sch.get_sblock("root")
    return sch


def knob_space(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[str | None, list[dict[str, int]]]:
    """``(rule, candidates)``: the default rule of a CPU kernel and, if it has knobs
    (:data:`TUNABLE`), every combination of them (:func:`.knobs.space`), the default first; a
    combination under which another rule would take the kernel is left out. ``(rule, [])`` for
    a kernel whose rule has no knobs, ``(None, [])`` where no rule applies."""
    lanes = vector_lanes(target)
    found = apply_cpu_rules(mod, lanes)
    if found is None:
        return None, []
    rule = found[0]
    if rule not in TUNABLE:
        return rule, []

    def apply(knobs) -> bool:
        got = apply_cpu_rules(mod, lanes, knobs)
        return got is not None and got[0] == rule

    return rule, space(apply)


def traced_candidate(mod: tvm.IRModule, target: tvm.target.Target, values: dict[str, int]) -> Schedule:
    """The default rule's schedule with its knobs set to ``values``, each pick recorded in the
    trace (a ``SampleCategorical`` with its decision), so the record replays to it."""
    knobs = Fixed(None, values)
    found = apply_cpu_rules(mod, vector_lanes(target), knobs)
    if found is None:
        raise ValueError("no default rule takes this kernel")
    return found[1]
