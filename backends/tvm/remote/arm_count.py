"""ARM cost without a board: the instructions a call executes on emulated aarch64, by class.

Wall time under qemu means nothing; what the emulated CPU *executes* is exact and reproducible.
:func:`count` runs TVM libraries and ONNX models in the emulated arm64 Python (:mod:`.arm_root`)
under Debian's dynamic ``qemu-aarch64`` with dcgraph's TCG plugin (``count_plugin.c``, built
here with gcc): every executed instruction is counted, classified once per translation block
from its encoding:

- ``fma``: vector FMLA/FMLS (by vector or by element), ``fma_lanes`` their multiply-adds
  (4 per 128-bit fp32 FMLA): the useful work of a conv;
- ``vector``: other Advanced SIMD vector instructions (moves, adds, max, dup, shuffles);
- ``ldst``: loads and stores (scalar and vector); ``branch``: branches and system instructions;
- ``scalar_fp``: scalar floating point; ``scalar_int``: everything else (address arithmetic).

The guest marks each item's timed calls with a system call nobody makes (``count_guest.py``),
so one emulated process counts many items; the counts are per call (the mean of ``calls``
calls after ``warmup`` ones, less what the marks themselves cost), on one thread (the plugin's
counters are not atomic), with a fixed environment: the same items counted again give the same
figures, instruction for instruction. Within a process a call's Python and allocator share moves
a little with what ran before it (a few thousand instructions; 0.3% of a 0.7 M-instruction block);
the kernel's own work (its FMAs) does not move at all.

What this measures and what it does not: the instruction mix and count (``per_mac``: the
fp32 NEON ideal is 0.25 instructions per multiply-add, one 4-lane FMA per 4 MACs), not time:
no cache misses, memory bandwidth, issue width or latency chains. A kernel that trades
instructions for memory traffic looks better here than it runs.

The peer runs the same way: ONNX Runtime's aarch64 wheel (MLAS NEON kernels) in the same
Python. Its newest wheel that loads under qemu 7.2 is :data:`ORT_VERSION` (1.28-1.32 crash at
import with SIGSEGV in their static initialisers, with every ``QEMU_CPU`` tried).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmulationUnavailable
from .arm_root import PY_VERSION, QEMU_CPU, ArmRoot, _locked, _oneline, apt_install, ensure_arm_root

__all__ = ["CLASSES", "ORT_VERSION", "Counter", "Counts", "Item", "count", "ensure_counter"]

#: the dynamic qemu-user (Debian ``qemu-user``): the static build the RPC server uses takes no plugins
QEMU_DYNAMIC = "qemu-aarch64"
QEMU_PACKAGE = "qemu-user"
#: the newest onnxruntime aarch64 wheel that imports under qemu 7.2
ORT_VERSION = "1.27.0"
PLUGIN_SOURCE = Path(__file__).with_name("count_plugin.c")
GUEST_SCRIPT = Path(__file__).with_name("count_guest.py")
KINDS = ("tvm", "tvm_func", "ort")
CLASSES = ("total", "fma", "fma_lanes", "vector", "ldst", "branch", "scalar_fp", "scalar_int")

Progress = Callable[[str], None]
#: the labels of count_guest.py's empty regions (what marking costs)
EMPTY = 1 << 20


@dataclass(frozen=True)
class Counts:
    """Executed instructions of one call, by class (see the module doc)."""

    total: float
    fma: float
    fma_lanes: float
    vector: float
    ldst: float
    branch: float
    scalar_fp: float
    scalar_int: float

    @property
    def fma_share(self) -> float:
        """The share of executed instructions that are vector FMAs."""
        return self.fma / self.total if self.total else 0.0

    def per_mac(self, macs: float) -> float:
        """Instructions per multiply-add of the layer (fp32 NEON ideal: 0.25)."""
        return self.total / macs

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Item:
    """One thing to count: ``kind`` ``tvm`` (a Relax VM library exported for aarch64, called at
    ``entry``), ``tvm_func`` (a library of kernels: ``entry`` called with ``inputs``, every buffer
    of the kernel, its output last) or ``ort`` (an ONNX model, ``path`` a file), with its inputs."""

    name: str
    kind: str
    path: str
    inputs: Sequence[np.ndarray]
    entry: str = "main"


@dataclass(frozen=True)
class Counter:
    """What counting needs: the arm64 root, the dynamic qemu, the built plugin, ONNX Runtime."""

    arm_root: ArmRoot
    qemu: Path
    plugin: Path
    ort_site: Path

    def env(self, out: Path) -> dict[str, str]:
        """A fixed environment (counts shift slightly with the environment's size)."""
        root = self.arm_root.root
        return {
            "PATH": "/usr/bin:/bin", "HOME": str(root), "LANG": "C", "PYTHONHASHSEED": "0",
            "QEMU_LD_PREFIX": str(root), "QEMU_CPU": QEMU_CPU,
            "QEMU_PLUGIN": f"file={self.plugin},out={out}",
            "PYTHONPATH": f"{root / 'lib-dcgraph'}:{root / 'site-packages'}:{self.ort_site}",
            "PYTHONNOUSERSITE": "1", "TVM_USE_RUNTIME_LIB": "1",
            "DCGRAPH_ARM_PYTHON": str(self.arm_root.python),
            "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        }

    def command(self, *args: str) -> list[str]:
        return [str(self.qemu), str(self.arm_root.root / "usr" / "bin" / f"python{PY_VERSION}"), *args]


def _install_qemu(say: Progress) -> Path:
    found = shutil.which(QEMU_DYNAMIC)
    if found is None:
        try:
            apt_install([QEMU_PACKAGE], say)
        except EmulationUnavailable as exc:
            raise EmulationUnavailable(f"{QEMU_DYNAMIC} (plugin-capable qemu) missing and {exc}") from None
        found = shutil.which(QEMU_DYNAMIC)
    if found is None:
        raise EmulationUnavailable(f"{QEMU_DYNAMIC} still missing after apt-get install {QEMU_PACKAGE}")
    return Path(found)


def _build_plugin(dest: Path, say: Progress) -> Path:
    source = PLUGIN_SOURCE.read_bytes()
    lib = dest / f"libdcgraph_count-{hashlib.sha1(source).hexdigest()[:12]}.so"
    if lib.exists():
        return lib
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise EmulationUnavailable("no host C compiler (gcc) to build the counting plugin")
    say(f"host: building the counting plugin ({lib.name})")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".tmp{os.getpid()}")
    res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(PLUGIN_SOURCE)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise EmulationUnavailable(f"the counting plugin does not build: {_oneline(res.stderr)}")
    tmp.rename(lib)
    return lib


def _install_ort(dest: Path, say: Progress) -> Path:
    site = dest / f"onnxruntime-{ORT_VERSION}"
    if (site / "onnxruntime" / "__init__.py").exists():
        return site
    say(f"arm64: pip install onnxruntime=={ORT_VERSION} (manylinux aarch64 wheel)")
    tmp = Path(tempfile.mkdtemp(prefix=".ort-", dir=dest))
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-deps",
           "--progress-bar", "off", "--target", str(tmp), "--only-binary=:all:",
           "--python-version", PY_VERSION, "--implementation", "cp", "--platform", "manylinux_2_28_aarch64",
           "--platform", "manylinux_2_27_aarch64", f"onnxruntime=={ORT_VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_USER": "0"},
                         timeout=900)
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmulationUnavailable(f"pip could not fetch onnxruntime=={ORT_VERSION} for aarch64: "
                                   f"{_oneline(res.stderr, 2)}")
    tmp.rename(site)
    return site


def ensure_counter(arm_root: ArmRoot | None = None, progress: Progress | None = None) -> Counter:
    """The counting set-up (idempotent, < 1 s when ready): the arm64 root (:func:`ensure_arm_root`),
    Debian's ``qemu-user`` (apt, once), the plugin (built with gcc, cached by its source's hash)
    and ONNX Runtime's aarch64 wheel, both in the root's ``lib-dcgraph/count``. Raises
    :class:`EmulationUnavailable` where that is impossible here."""
    say: Progress = progress or (lambda _m: None)
    arm_root = arm_root or ensure_arm_root(progress=say)
    dest = arm_root.root / "lib-dcgraph" / "count"
    dest.mkdir(parents=True, exist_ok=True)
    with _locked(dest / ".lock"):
        qemu = _install_qemu(say)
        plugin = _build_plugin(dest, say)
        ort_site = _install_ort(dest, say)
    return Counter(arm_root, qemu, plugin, ort_site)


def _parse(text: str) -> dict[str, list[int]]:
    marks = {}
    for line in text.splitlines():
        label, *values = line.split()
        marks[label] = [int(v) for v in values]
    return marks


def _run_guest(counter: Counter, spec: Path, out: Path, cwd: Path, timeout: float,
               progress: Callable[[int, str], None] | None) -> tuple[int, str, str]:
    """Run the guest script; its stdout lines are read as they come (progress)."""
    import threading

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(counter.command(str(GUEST_SCRIPT), str(spec)), stdout=subprocess.PIPE,
                                stderr=err, text=True, env=counter.env(out), cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        lines = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if progress is not None and line.startswith('{"item"'):
                    msg = json.loads(line)
                    progress(msg["item"] + 1, msg["name"])
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        return rc, "".join(lines), err.read()


def count(items: Sequence[Item], counter: Counter | None = None, *, calls: int = 2, warmup: int = 1,
          timeout: float = 3600, outputs: dict[str, np.ndarray] | None = None,
          progress: Callable[[int, str], None] | None = None) -> dict[str, Counts]:
    """Executed instructions per call of each item, by class (one emulated process for all).

    ``calls``: calls counted per item (the figure is their mean; a deterministic call gives the
    same count each time), after ``warmup`` calls that are not (first-call set-up: allocation,
    ONNX Runtime's kernel selection). Raises ``RuntimeError`` with the guest's last lines if
    an item fails to load or run. ``outputs``: a dict to fill with each item's (first) output,
    to check against the reference. ``progress``: called with (items done, name) as each ends."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    counter = counter or ensure_counter()
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"item names must be unique: {names}")
    with tempfile.TemporaryDirectory(prefix="dcgraph-count-") as tmp_:
        tmp = Path(tmp_)
        spec_items = []
        saved: dict[int, str] = {}  # an array several items share (a kernel's candidates) is saved once
        for i, it in enumerate(items):
            if it.kind not in KINDS:
                raise ValueError(f"item {it.name!r}: kind must be one of {', '.join(KINDS)}, got {it.kind!r}")
            paths = []
            for j, a in enumerate(it.inputs):
                if id(a) not in saved:
                    saved[id(a)] = str(tmp / f"in{i}_{j}.npy")
                    np.save(saved[id(a)], np.ascontiguousarray(a))
                paths.append(saved[id(a)])
            spec_items.append({"name": it.name, "kind": it.kind, "path": str(Path(it.path).absolute()),
                               "inputs": paths, "entry": it.entry,
                               "save": str(tmp / f"out{i}.npy") if outputs is not None else None})
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"items": spec_items, "calls": calls, "warmup": warmup}))
        out = tmp / "counts.txt"
        rc, stdout, stderr = _run_guest(counter, spec, out, tmp, timeout, progress)
        marks = _parse(out.read_text()) if out.exists() else {}
        if rc != 0 or '"done"' not in stdout:
            raise RuntimeError(f"counting on emulated aarch64 failed (rc {rc}): "
                               f"{_oneline(stderr or stdout, 4)}")
        if outputs is not None:
            for i, it in enumerate(items):
                outputs[it.name] = np.load(tmp / f"out{i}.npy")
    result = {}
    empty = _region(marks, EMPTY + 2, "the empty region")  # what the marks cost (the second one)
    for i, it in enumerate(items):
        region = _region(marks, 2 * i, f"item {it.name!r}")
        result[it.name] = Counts(*((r - e) / calls for r, e in zip(region, empty, strict=True)))
    return result


def _region(marks: dict[str, list[int]], start: int, what: str) -> list[int]:
    a, b = marks.get(str(start)), marks.get(str(start + 1))
    if a is None or b is None:
        raise RuntimeError(f"no count marks for {what} (the plugin wrote {sorted(marks)})")
    return [y - x for x, y in zip(a, b, strict=True)]


def object_items(objects: dict[str, Any], inputs: Sequence[np.ndarray], directory: str | os.PathLike
                 ) -> list[Item]:
    """Items for objects in memory, written into ``directory``: each value a TVM Relax executable
    built for aarch64 (exported with the cross gcc) or an ``onnx.ModelProto``; all take ``inputs``."""
    from .arm_server import cross_compiler

    items = []
    for i, (name, obj) in enumerate(objects.items()):
        if hasattr(obj, "export_library"):
            path = Path(directory) / f"lib{i}.so"
            obj.export_library(str(path), fcompile=cross_compiler())
            items.append(Item(name, "tvm", str(path), inputs))
        elif hasattr(obj, "SerializeToString"):
            path = Path(directory) / f"model{i}.onnx"
            path.write_bytes(obj.SerializeToString())
            items.append(Item(name, "ort", str(path), inputs))
        else:
            raise TypeError(f"{name!r}: expected a TVM executable or an onnx.ModelProto, "
                            f"got {type(obj).__name__}")
    return items


def count_objects(objects: dict[str, Any], inputs: Sequence[np.ndarray], counter: Counter | None = None,
                  **kw: Any) -> dict[str, Counts]:
    """:func:`count` for objects in memory (:func:`object_items`)."""
    with tempfile.TemporaryDirectory(prefix="dcgraph-count-lib-") as tmp:
        return count(object_items(objects, inputs, tmp), counter, **kw)


def kernel_items(mod: Any, target: Any, directory: str | os.PathLike, prefix: str = "") -> list[Item]:
    """One ``tvm_func`` item per kernel (PrimFunc) of a scheduled Relax module (``pipeline.optimize``):
    each built alone for ``target`` (aarch64), exported into ``directory`` and fed fixed
    pseudo-random buffers: where a block's or a model's instructions go."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from ..tuning.measure import fixed_inputs
    from .arm_server import cross_compiler

    items = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=target)
        path = Path(directory) / f"{prefix}{name}.so"
        lib.export_library(str(path), fcompile=cross_compiler())
        info = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(func)]
        items.append(Item(f"{prefix}{name}", "tvm_func", str(path), fixed_inputs(info), entry=name))
    return items
