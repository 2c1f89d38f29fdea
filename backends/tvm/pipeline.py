"""The Relax compilation pipeline: TVM's own passes plus dcgraph's default schedules.

``[blocked layout (CPU)] -> fold constants -> legalize -> annotate -> fold constants -> FuseOps ->
FuseTIR -> [tuned records] -> default schedules -> TVM's lowering``. Tuned records (a MetaSchedule
database) win where they match; every other PrimFunc gets the rules of :mod:`.schedules` (CPU or GPU), and
:func:`kernel_report` says which kernel got what.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tvm
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_backend
from tvm.relax.backend.cuda import pipeline as cuda_backend

from .fast_math import legalize_sigmoid, legalize_silu
from .layout import block_layout
from .lowering import kernel_origin
from .packed_matmul import legalize_matmul
from .pixel_matmul import legalize_conv2d
from .schedules import SCHEDULED, DefaultSchedule, is_tuned, vector_lanes
from .targets import is_gpu


def _backend(target: tvm.target.Target):
    return cuda_backend if target.kind.name == "cuda" else cpu_backend


LAYOUTS = ("auto", "blocked", "nchw")


def uses_blocked(target: tvm.target.Target, layout: str = "auto") -> bool:
    """Whether ``layout`` means the blocked layout on ``target`` (``auto``: every CPU target)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return layout != "nchw" and not is_gpu(target)


def _legalize_map(target: tvm.target.Target) -> dict:
    """dcgraph's legalizations in place of TVM's, on CPU targets: float32 ``sigmoid`` becomes the
    vectorisable polynomial of :mod:`.fast_math` (TVM's calls scalar ``expf`` per element), and
    ``nn.silu`` likewise, a
    conv on one pixel per sample a matmul (:mod:`.pixel_matmul`), a matmul with a constant weight
    the packed-panel kernel (:mod:`.packed_matmul`)."""
    if is_gpu(target):
        return {}
    lanes = vector_lanes(target)
    return {"relax.sigmoid": legalize_sigmoid, "relax.nn.silu": legalize_silu,
            "relax.nn.conv2d": functools.partial(legalize_conv2d, lanes=lanes),
            "relax.matmul": functools.partial(legalize_matmul, lanes=lanes)}


def fuse(mod: tvm.IRModule, target: tvm.target.Target, layout: str = "auto", winograd: bool = True
         ) -> tvm.IRModule:
    """Legalize and fuse ``mod``: its PrimFuncs are then the kernels that get tuned or scheduled
    (what :mod:`.tuning` extracts as tasks, and what :func:`optimize` schedules). ``layout``:
    ``auto`` (blocked ``NCHW[x]c`` on CPU targets, :mod:`.layout`), ``blocked`` or ``nchw``.
    ``winograd``: in the blocked layout, 3x3 stride-1 convs as Winograd F(m, 3) (:mod:`.winograd`);
    False keeps every conv direct."""
    if uses_blocked(target, layout):
        mod = block_layout(mod, vector_lanes(target), use_winograd=winograd)
    passes = [
        *_backend(target).library_dispatch_passes(target),
        relax.transform.FoldConstant(),  # a weight's permute_dims: a constant for legalize_matmul
        relax.transform.LegalizeOps(customize_legalize_map=_legalize_map(target)),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # a reshape left alone (the 1x1 convs' flat views, layout.py) is a view, not a kernel
        relax.transform.RewriteDataflowReshape(),
        relax.transform.DeadCodeElimination(),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def optimize(mod: tvm.IRModule, target: tvm.target.Target, database=None, layout: str = "auto",
             winograd: bool = True) -> tvm.IRModule:
    """Legalize, fuse and schedule ``mod`` (``database``: MetaSchedule records to apply first;
    ``layout``, ``winograd``: as for :func:`fuse`)."""
    mod = fuse(mod, target, layout, winograd)
    with target:
        if database is not None:
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        return DefaultSchedule(target)(mod)


def lower_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's passes after scheduling: dataflow lowering, memory planning, VM lowering."""
    backend = _backend(target)

    @tvm.transform.module_pass(opt_level=0, name="dcgraph.Lower")
    def _lower(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                backend.dataflow_lower_passes(target) + backend.finalize_passes(target))(mod)

    return _lower


def relax_pipeline(target: tvm.target.Target, database=None, layout: str = "auto", winograd: bool = True
                   ) -> tvm.transform.Pass:
    """The whole pipeline as one pass, for ``tvm.compile(mod, target, relax_pipeline=...)``."""

    @tvm.transform.module_pass(opt_level=0, name="dcgraph.Pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return lower_pipeline(target)(optimize(mod, target, database, layout, winograd))

    return _pipeline


@dataclass(frozen=True)
class KernelInfo:
    """One PrimFunc of a compiled model: its name, what emitted it, how it was scheduled."""

    name: str
    origin: str  # "dcgraph" (a fused Deep Control kernel) or "tvm" (TVM's own legalized ops)
    schedule: str  # "tuned" (a database record), "default" (dcgraph/dlight rule) or "none"


def kernel_report(mod: tvm.IRModule) -> list[KernelInfo]:
    """Every PrimFunc of an optimized module and how it was scheduled."""
    infos = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs or {}
        origin = kernel_origin(gv.name_hint, attrs)
        if is_tuned(func):
            schedule = "tuned"
        elif SCHEDULED in attrs:
            schedule = "default"
        else:
            schedule = "none"
        infos.append(KernelInfo(gv.name_hint, origin, schedule))
    return sorted(infos, key=lambda k: k.name)
