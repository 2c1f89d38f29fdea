"""What the tuning loop sets up around MetaSchedule: the cost model, the tuning target, the device
check, MetaSchedule's log file, the builder/runner/cost-model trio made on first use, and the
Ctrl-C watch that tells an interrupt from an error inside MetaSchedule's C++ loop."""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from .. import targets as targets_
from ..errors import DeviceUnavailable, TuneError
from .measure import Runner, build, export, export_arm, write_reference
from .tasks import Task

__all__ = ["COST_MODELS", "POPULATION", "SigintWatch", "Tools", "cost_model_choice", "device_check",
           "import_tensor_intrin", "redirect_logs", "tuning_target"]

#: the evolutionary search's largest population (MetaSchedule's default); smaller for small batches
POPULATION = 512

COST_MODELS = ("auto", "xgb", "random")


def cost_model_choice(choice: str) -> tuple[str, str]:
    """(MetaSchedule cost model name, description for the report)."""
    if choice not in COST_MODELS:
        raise TuneError(f"unknown cost model {choice!r}; expected one of {', '.join(COST_MODELS)}")
    try:
        import xgboost  # noqa: F401

        have = True
    except ImportError:
        have = False
    if choice == "xgb" and not have:
        raise TuneError("cost model 'xgb' needs xgboost (pip install xgboost-cpu); "
                        "or use --cost-model random")
    if choice == "random" or not have:
        why = "" if choice == "random" else " (xgboost is not installed; pip install xgboost-cpu for XGBoost)"
        return "random", "random" + why
    return "xgb", "XGBoost"


def import_tensor_intrin() -> None:
    """``import tvm.s_tir.tensor_intrin`` (``TuneContext`` does it) in ~3 s instead of 30-80.

    Its TVMScript parser calls ``inspect.stack()`` hundreds of times; for every frame without a
    module file (importlib's frozen frames) ``inspect.getmodule`` scans all of ``sys.modules``
    (thousands with torch loaded). Remembering those misses for the import makes it fast.
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original, misses = inspect.getmodule, set()

    def getmodule(obj: Any, _filename: str | None = None) -> Any:
        if _filename is not None and _filename in misses:
            return None
        found = original(obj, _filename)
        if found is None and _filename is not None:
            misses.add(_filename)
        return found

    inspect.getmodule = getmodule
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.getmodule = original


def tuning_target(tgt: tvm.target.Target, cores: int) -> tvm.target.Target:
    """MetaSchedule needs ``num-cores`` in a CPU target."""
    if tgt.kind.name == "llvm" and "num-cores" not in tgt.attrs:
        spec = {k: v for k, v in tgt.export().items() if k not in ("host", "keys", "tag")
                and not k.startswith("feature.")}
        spec["num-cores"] = cores
        return tvm.target.Target(spec)
    return tgt


def device_check(rpc: tuple[str, int], key: str) -> tuple[int, int]:
    """(servers registered for ``key``, the device's thread count): fails early and clearly."""
    from ..remote.rpc import count_servers, request_session, tracker_summary

    try:
        servers = count_servers(tracker_summary(*rpc), key)
        session = request_session(*rpc, key, timeout=60)
        threads = int(session.get_function("runtime.NumThreads")())
    except DeviceUnavailable as exc:
        raise TuneError(str(exc)) from None
    return servers, threads


def redirect_logs(directory: Path) -> tuple[logging.Logger, list[tuple[logging.Logger, logging.Handler, bool]]
                                            ]:
    """MetaSchedule's log lines go to ``<db>/logs/`` instead of the console."""
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(directory / "logs" / "tune.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s %(message)s"))
    undo = []
    for name in ("tvm.s_tir.meta_schedule", "dcgraph.tune"):
        lg = logging.getLogger(name)
        undo.append((lg, handler, lg.propagate))
        lg.addHandler(handler)
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    return logging.getLogger("dcgraph.tune"), undo

class SigintWatch:
    """Notes a Ctrl-C: raised inside MetaSchedule's C++ loop, a KeyboardInterrupt comes back out
    of it as a plain RuntimeError, and this tells the two apart."""

    def __init__(self) -> None:
        import signal
        import threading

        self.seen = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

#: local builders and runners kept between ``tune`` calls of one process, by configuration: each
#: new worker pool costs ~10-15 s of start-up here (every worker imports TVM), and a process that
#: tunes block after block (``dcgraph bench op --tune``, a test session) would pay it every call.
#: Over RPC nothing is kept (the tracker and its devices change between calls).
_KEPT: dict[tuple, Any] = {}


def _release_kept() -> None:
    for obj in _KEPT.values():
        if isinstance(obj, Runner):
            obj.shutdown()
    _KEPT.clear()


atexit.register(_release_kept)


class Tools:
    """Builder, runner and cost model, made on first use (a resumed run with nothing left to tune
    needs none of them and skips their ~10 s of worker start-up). A local builder and runner
    are kept for the next ``tune`` call of this process (:data:`_KEPT`) unless the run was
    interrupted or failed (:meth:`close`)."""

    def __init__(self, target: tvm.target.Target, tuning_target: tvm.target.Target,
                 rpc: tuple[str, int, str] | None, workers: int, timeout: float, cost_model: str) -> None:
        self.target, self.tuning_target = target, tuning_target
        self.rpc, self.workers, self.timeout, self.cost_model_name = rpc, workers, timeout, cost_model
        self.ncpu = os.cpu_count() or 1
        self._builder = self._runner = self._cost = None
        self._references: dict[str, str] = {}

    @property
    def builder(self) -> ms.builder.LocalBuilder:
        if self._builder is None:
            arm = targets_.is_arm(self.target) and not targets_.runs_here(self.target)
            key = ("builder", arm, self.ncpu)
            if key not in _KEPT:
                _KEPT[key] = ms.builder.LocalBuilder(f_build=build, f_export=export_arm if arm else export,
                                                     max_workers=self.ncpu, timeout_sec=120)
            self._builder = _KEPT[key]
        return self._builder

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            # here: five blocks of >= 20 ms (a candidate's time is their mean, its spread in the
            # record); the emulated devices behind RPC are slow, one block of 20 ms there
            evaluator = (ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20) if self.rpc else
                         ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=20))
            if self.rpc:
                self._runner = Runner(self.rpc, self.workers, self.timeout, evaluator)
            else:
                key = ("runner", self.workers, self.timeout)
                if key not in _KEPT:
                    _KEPT[key] = Runner(None, self.workers, self.timeout, evaluator)
                self._runner = _KEPT[key]
                self._runner.reference = None
        return self._runner

    @property
    def cost_model(self) -> ms.cost_model.CostModel:
        if self._cost is None:
            self._cost = (ms.cost_model.CostModel.create("xgb", num_tuning_cores=self.ncpu)
                          if self.cost_model_name == "xgb" else ms.cost_model.CostModel.create("random"))
        return self._cost

    def reference(self, task: Task, scratch: Path) -> None:
        """Point the runner at ``task``'s reference outputs (computed once)."""
        if task.name not in self._references:
            self._references[task.name] = str(write_reference(task, scratch))
        self.runner.reference = self._references[task.name]

    def close(self, keep: bool = True) -> None:
        """Shut down what this run made; a kept local builder/runner stays up for the next run
        unless ``keep`` is False (an interrupted or failed run: its workers may be mid-job)."""
        kept = any(v is self._runner for v in _KEPT.values())
        if self._runner is not None and (not keep or not kept):
            self._runner.shutdown()
        if not keep:
            for key in [k for k, v in _KEPT.items() if v is self._runner or v is self._builder]:
                del _KEPT[key]
