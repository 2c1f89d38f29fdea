"""TVM lowering of the fused Deep Control op (installed as ``dcgraph.backends.tvm``).

``compile(model, target="x86"|"arm"|"cuda"|dict, example_inputs)`` -> :class:`CompiledModel`
(call it, ``.export(path)``, :func:`load` it back, ``.remote(session)`` for RPC devices);
``tuning.tune(...)`` autotunes a model's kernels into a database ``compile`` applies.
The rooms, in the order a model passes through them (see ARCHITECTURE.md):

- :mod:`.frontends`: any model kind -> Relax (torch.export, ONNX), dcgraph's passes first;
- :mod:`.lowering` (emit the fused op, its options), :mod:`.kernels` (TE definitions),
  :mod:`.fuse_plain` (Deep Control written as plain Relax ops);
- :mod:`.pipeline` (TVM's fusion, records, default schedules, lowering), :mod:`.schedules`
  (the default rules: CPU, GPU), :mod:`.database` (one tuning database per target);
- :mod:`.compiler` (``compile``), :mod:`.runtime` (``CompiledModel``, ``load``, RPC models);
- :mod:`.tuning` (MetaSchedule tasks, measurement, report, the loop);
- :mod:`.remote` (RPC tracker/server processes, the emulated arm64 root and its server);
- :mod:`.targets` (presets), :mod:`.errors` (every error raised on purpose).
"""

import os

# TVM's CPU thread pool assumes two hardware threads per x86 core and starts cpu_count() / 2
# workers when TVM_NUM_THREADS is unset: one on these 2-core VMs, which halved every kernel's
# speed for a user who did not know to set it (the benchmark harness always did). Use every CPU
# this process may run on unless told otherwise; read when the pool starts (the first kernel).
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

from .compiler import compile
from .errors import CompileError, TargetError
from .runtime import CompiledModel, load
from .targets import PRESETS, resolve

__all__ = ["PRESETS", "CompileError", "CompiledModel", "TargetError", "compile", "load", "resolve"]
