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
from .cpu import CPU_RULES, apply_cpu_rules, schedule_func_cpu, vector_lanes

__all__ = ["CPU_RULES", "IS_SCHEDULED", "SCHEDULED", "DefaultSchedule", "apply_cpu_rules", "conv_stages",
           "find_conv_block", "is_tuned", "schedule_func_cpu", "traced_default", "vector_lanes"]


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
