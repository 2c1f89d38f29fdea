"""The suite's plumbing: threads, row statuses, check-then-time, result files.

A *row* is one way of computing a benchmark case. :func:`check_and_time` builds every row,
runs it once and compares its output with the case's reference; only rows that pass are
timed, round-robin (:func:`.common.time_interleaved`), each sample a block of several
back-to-back calls so that one runtime's thread pool spinning down after its call does not
land on the next row's call. A row ends in one of four statuses:

- ``ok``: checked and timed (median, inter-quartile range and minimum per call, in ms);
- ``failed``: it raised, or its output differs from the reference: reported, never timed;
- ``not yet``: it depends on work that is not done (autotuning without a database);
- ``skipped``: left out on purpose (``--quick``, a missing runtime, no GPU), with the reason.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcgraph.compare import relative_error

from .common import geomean, machine_info, results_dir, time_interleaved, write_results

OK, FAILED, NOT_YET, SKIPPED = "ok", "failed", "not yet", "skipped"


class NotYet(Exception):
    """The row depends on work that is not done yet (the reason is the message)."""


class Skipped(Exception):
    """The row is left out on purpose (the reason is the message)."""


#: PyTorch's OpenMP workers (libgomp) spin after each parallel region unless this is PASSIVE; read
#: once, when torch loads libgomp, so it must be in the environment before ``import torch``
#: (:func:`passive_openmp_argv`). Spinning, they took the cores from the next row's call: ONNX
#: Runtime's ResNet-18 ran 15.3 ms after a torch row and 9.8 ms with PASSIVE (2-core Zen 5).
OPENMP_WAIT = "OMP_WAIT_POLICY"


def passive_openmp_argv(argv: list[str], module: str) -> list[str] | None:
    """The command to re-run this process (``argv``: ``sys.argv``; ``module``: what
    ``python -m`` runs when ``argv[0]`` is a ``__main__.py``) with torch's OpenMP threads not
    spinning, or None when they already do not (``OMP_WAIT_POLICY`` set, by the user or by the
    re-run). Sets the variable for the re-run."""
    if OPENMP_WAIT in os.environ:
        return None
    os.environ[OPENMP_WAIT] = "PASSIVE"
    if argv[0].endswith("__main__.py"):
        return [sys.executable, "-m", module, *argv[1:]]
    return [sys.executable, *argv]


def rerun_with_passive_openmp(module: str) -> None:
    """Replace this process by itself with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set (the
    benchmark commands call this first; never from a library call or a test)."""
    rerun = passive_openmp_argv(sys.argv, module)
    if rerun is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(rerun[0], rerun)


def set_threads(threads: int) -> None:
    """Fix every runtime's thread count: torch (and inductor's OpenMP code), TVM (read when its
    pool starts, so before the first TVM call), ONNX Runtime (per session, see ``ort_session``).
    TVM's workers spin after each call and steal the cores from the next runtime's call:
    spinning off (``TVM_THREAD_POOL_SPIN_COUNT=0``), as every TVM timing here; torch's OpenMP
    threads likewise (:data:`OPENMP_WAIT`, set before torch loads)."""
    import torch

    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def versions() -> dict[str, str]:
    """Versions of every runtime the suite compares (those importable here)."""
    out = {}
    for name, mod in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("tvm", "tvm"),
                      ("numpy", "numpy"), ("matplotlib", "matplotlib")):
        try:
            out[name] = __import__(mod).__version__
        except Exception as e:  # a missing runtime is reported, not fatal
            out[name] = f"not available ({type(e).__name__})"
    import torch

    out["torch_cuda"] = torch.version.cuda or "none"
    return out


def why(err: BaseException) -> str:
    """One line for an exception (TVM's errors end in the useful line)."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1][:160] if lines else ''}"


def to_numpy(out: Any) -> np.ndarray:
    if isinstance(out, list | tuple):
        out = out[0]
    if hasattr(out, "detach"):  # torch
        return out.detach().cpu().double().numpy()
    if hasattr(out, "numpy") and not isinstance(out, np.ndarray):  # tvm.runtime.Tensor
        return out.numpy().astype(np.float64)
    return np.asarray(out, dtype=np.float64)


@dataclass
class Candidate:
    """One row of one case: ``build()`` returns a zero-argument callable (or raises
    :class:`NotYet` / :class:`Skipped`); its output is checked against ``want``."""

    key: str
    build: Callable[[], Callable[[], Any]]
    want: np.ndarray
    tol: float = 1e-4
    info: dict = field(default_factory=dict)  #: extra facts for the JSON (kernels tuned, compile s)


def _block(fn: Callable[[], Any], inner: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            fn()
    return run


def check_and_time(candidates: list[Candidate], repeats: int, block_ms: float = 10.0,
                   warmup: int = 2, no_grad: bool = True) -> dict[str, dict]:
    """Build, check and time ``candidates``; one result dict per row key (see the module doc)."""
    import contextlib

    import torch

    results: dict[str, dict] = {}
    fns: dict[str, Callable[[], Any]] = {}
    ctx = torch.no_grad if no_grad else contextlib.nullcontext
    with ctx():
        for c in candidates:
            t0 = time.perf_counter()
            res: dict[str, Any] = dict(c.info)
            results[c.key] = res
            try:
                fn = c.build()
                got = to_numpy(fn())
                res["build_s"] = round(time.perf_counter() - t0, 2)
                res.update(c.info)  # build() may have added facts
                err = relative_error(got, c.want)
                res["error"] = err
                if not err < c.tol:
                    res.update(status=FAILED, why=f"wrong result: relative error {err:.1e} "
                                                  f"(tolerance {c.tol:.0e}); not timed")
                    continue
                t1 = time.perf_counter()
                fn()
                once_ms = 1e3 * (time.perf_counter() - t1)
                res["inner"] = max(1, min(200, math.ceil(block_ms / max(once_ms, 1e-3))))
                res["status"] = OK
                fns[c.key] = fn
            except NotYet as e:
                res.update(status=NOT_YET, why=str(e))
            except Skipped as e:
                res.update(status=SKIPPED, why=str(e))
            except Exception as e:  # a row that cannot build or run is reported; the others still run
                res.update(status=FAILED, why=why(e))
        if fns:
            timed = time_interleaved({k: _block(fn, results[k]["inner"]) for k, fn in fns.items()},
                                     repeats, warmup=warmup)
            for key, stats in timed.items():
                for m, v in stats.items():
                    results[key][m] = v / results[key]["inner"]
    return results


def stem(level: str, quick: bool, suffix: str = "") -> str:
    return f"fusion_{level}{suffix}" + ("_quick" if quick else "")


def save_plot(fig: Any, name: str) -> Path:
    """Write a matplotlib figure to ``results/<name>.png`` atomically."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def header(threads: int, extra: str = "") -> tuple[dict, str]:
    """Machine info + versions, and the one-paragraph description every table starts with."""
    info = machine_info()
    info["threads"] = threads
    info["versions"] = versions()
    v = info["versions"]
    spin = ("no thread pool spinning (OMP_WAIT_POLICY=PASSIVE, TVM spin count 0, ORT spinning off)"
            if os.environ.get(OPENMP_WAIT, "").upper() == "PASSIVE" else
            f"torch's OpenMP threads spin (OMP_WAIT_POLICY {info['omp_wait_policy']})")
    text = (f"{info['cpu']}, {info['cores']} cores, {threads} threads for every runtime, {spin}; torch "
            f"{info['torch']}, onnxruntime {v['onnxruntime']}, TVM {v['tvm']}; {info['date']}." + extra)
    return info, text


def fmt_ms(r: dict) -> str:
    if r.get("status") != OK:
        return {FAILED: "FAILED", NOT_YET: "not yet", SKIPPED: "skipped"}.get(r.get("status", ""), "?")
    return f"{r['median_ms']:.3f} ±{r['iqr_ms'] / 2:.3f}"


__all__ = [
    "FAILED",
    "NOT_YET",
    "OK",
    "SKIPPED",
    "Candidate",
    "NotYet",
    "Skipped",
    "check_and_time",
    "fmt_ms",
    "geomean",
    "header",
    "machine_info",
    "relative_error",
    "results_dir",
    "save_plot",
    "set_threads",
    "stem",
    "to_numpy",
    "versions",
    "why",
    "write_results",
]
