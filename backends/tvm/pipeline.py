"""The Relax compilation pipeline: TVM's own passes plus dcgraph's default schedules.

``legalize -> annotate -> fold constants -> FuseOps -> FuseTIR -> [tuned records] ->
default schedules -> TVM's lowering``. Tuned records (a MetaSchedule database) win where
they match; every other PrimFunc gets :mod:`.schedules` (CPU) or dlight (GPU) rules, and
:func:`schedule_report` says which kernel got what.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from . import schedules


def is_gpu(target: tvm.target.Target) -> bool:
    return "gpu" in list(target.keys)


@tvm.transform.module_pass(opt_level=0, name="dcgraph.DefaultSchedule")
class DefaultSchedule:
    """Schedule every not-yet-scheduled PrimFunc of the module for ``target``."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if is_gpu(self.target):
            from . import gpu
            return gpu.default_schedule(mod, self.target)
        lanes = schedules.vector_lanes(self.target)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _scheduled(func):
                continue
            new = schedules.schedule_func_cpu(func, lanes)
            if new is not None:
                updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def _scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs or {}
    return bool(attrs.get("tir.is_scheduled", False)) or schedules.SCHEDULED in attrs


def relax_pipeline(target: tvm.target.Target, database=None) -> tvm.transform.Pass:
    """The full Relax pipeline for ``target``; ``database``: a MetaSchedule database or None."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    backend = cuda if target.kind.name == "cuda" else cpu

    @tvm.transform.module_pass(opt_level=0, name="dcgraph.Pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        passes = [
            *backend.library_dispatch_passes(target),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
        with target:
            mod = tvm.transform.Sequential(passes)(mod)
            if database is not None:
                with database:
                    mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            mod = DefaultSchedule(target)(mod)
            mod = tvm.transform.Sequential(
                backend.dataflow_lower_passes(target) + backend.finalize_passes(target))(mod)
        return mod

    return _pipeline
