"""Run a library written by ``CompiledModel.export`` with TVM's runtime alone.

This file imports nothing but the standard library, numpy and TVM's runtime
(``TVM_USE_RUNTIME_LIB=1``: no compiler library is loaded), so it is also a script to copy next
to the library on a device that has neither dcgraph, torch nor TVM's compiler::

    python runner.py model.so --input x.npy -o y.npy --time

``dcgraph run`` runs this same file on this machine. The ``.json`` beside the library gives the
input signature and, for a model compiled with ``max_batch``, its batch buckets: a batch of any
size runs as the bucket calls :func:`plan_batches` chooses, outputs concatenated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: the ``format`` of the ``.json`` beside every exported library
FORMAT = "dcgraph-tvm/1"

__all__ = ["FORMAT", "Library", "RunnerError", "main", "pad_batch", "plan_batches", "quiet_native_stderr",
           "run_buckets"]


class RunnerError(ValueError):
    """A problem the user can fix: a missing file, a wrong input; printed in one line."""


def plan_batches(n: int, buckets: Sequence[int]) -> list[tuple[int, int]]:
    """How a batch of ``n`` runs on ``buckets``: ``(bucket, samples)`` calls, in order, whose
    samples add up to ``n`` (a call with fewer samples than its bucket is zero-padded). Chosen
    for the fewest padded samples, then the fewest calls; batches above the largest bucket run
    as several calls."""
    if n < 1:
        raise RunnerError(f"a batch needs at least one sample, got {n}")
    sizes = sorted({int(b) for b in buckets})
    best: list[tuple[int, int, int]] = [(0, 0, 0)]  # per k samples: (padded, calls, last bucket)
    for k in range(1, n + 1):
        best.append(min((best[k - min(b, k)][0] + b - min(b, k), best[k - min(b, k)][1] + 1, b)
                        for b in sizes))
    plan, k = [], n
    while k:
        b = best[k][2]
        plan.append((b, min(b, k)))
        k -= min(b, k)
    return plan[::-1]


class Library:
    """An exported library and its signature, on TVM's runtime; call it with numpy arrays."""

    def __init__(self, path: str | os.PathLike) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        path = Path(path)
        side = Path(str(path) + ".json")
        if not path.is_file() or not side.is_file():
            raise RunnerError(f"{path} and {side.name} must both exist (written by dcgraph compile)")
        try:
            self.meta = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            raise RunnerError(f"{side} is not readable JSON: {e}") from None
        if self.meta.get("format") != FORMAT:
            raise RunnerError(f"{side} is not a dcgraph TVM library description "
                              f"(format {self.meta.get('format')!r})")
        self.inputs = self.meta["inputs"]
        batch = self.meta.get("batch") or {}
        self.entries = {int(b): name for b, name in batch.get("entries", {}).items()}
        self.dev = tvm.cpu(0)
        try:
            with quiet_native_stderr():
                self.vm = VirtualMachine(tvm.runtime.load_module(str(path)), self.dev)
        except Exception as e:  # a library for another machine, or a damaged file
            raise RunnerError(f"cannot load {path.name} here: {str(e).strip().splitlines()[-1]}") from None
        self._tensor = tvm.runtime.tensor

    def check(self, arrays: Sequence[np.ndarray]) -> int:
        """The batch size of ``arrays`` after checking them against the signature."""
        if len(arrays) != len(self.inputs):
            raise RunnerError(f"the model takes {len(self.inputs)} inputs, got {len(arrays)}")
        batches = set()
        for i, (a, spec) in enumerate(zip(arrays, self.inputs, strict=True)):
            want = [int(s) for s in spec["shape"]]
            if self.entries:
                want[0] = -1
            if a.ndim != len(want) or any(w not in (-1, s) for w, s in zip(want, a.shape, strict=True)):
                raise RunnerError(f"input {i} ({spec['name']}) has shape {tuple(a.shape)}; the model takes "
                                  f"{tuple('N' if w == -1 else w for w in want)}")
            if str(a.dtype) != spec["dtype"]:
                raise RunnerError(f"input {i} ({spec['name']}) is {a.dtype}; the model takes {spec['dtype']}")
            batches.add(a.shape[0] if a.ndim else 1)
        if len(batches) > 1:
            raise RunnerError(f"the inputs disagree on the batch size: {sorted(batches)}")
        return batches.pop() if batches else 1

    def _call(self, name: str, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = self.vm[name](*[self._tensor(np.ascontiguousarray(a), self.dev) for a in arrays])
        return [t.numpy() for t in _flatten(out)]

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """The model's outputs (a list, nested tuples flattened) for ``arrays``."""
        n = self.check(arrays)
        if not self.entries:
            return self._call("main", arrays)
        return run_buckets(self._call, self.entries, arrays, n)


def run_buckets(call: Any, entries: dict[int, str], arrays: Sequence[np.ndarray], n: int
                ) -> list[np.ndarray]:
    """A batch of ``n`` through bucket entries (``{bucket: function name}``): ``call(name, arrays)``
    per :func:`plan_batches` step, each on its slice (zero-padded to the bucket), outputs trimmed
    to the real samples and concatenated along the batch."""
    parts, lo = [], 0
    for bucket, take in plan_batches(n, list(entries)):
        chunk = [pad_batch(a[lo:lo + take], bucket) for a in arrays]
        parts.append([o[:take] for o in call(entries[bucket], chunk)])
        lo += take
    return [np.concatenate(outs) if len(outs) > 1 else outs[0] for outs in zip(*parts, strict=True)]


def pad_batch(a: np.ndarray, bucket: int) -> np.ndarray:
    """``a`` with zero samples appended up to ``bucket`` (``a`` itself when it has that many)."""
    if a.shape[0] == bucket:
        return a
    return np.concatenate([a, np.zeros((bucket - a.shape[0], *a.shape[1:]), a.dtype)])


@contextlib.contextmanager
def quiet_native_stderr():
    """Hold back what TVM's C++ side writes to stderr (export and load log a "Scope Saving" /
    "Scope Loaded" warning per constant); replay it if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _flatten(out: Any) -> list[Any]:
    if hasattr(out, "numpy"):
        return [out]
    return [leaf for item in out for leaf in _flatten(item)]


def _load_inputs(paths: Sequence[str]) -> list[np.ndarray]:
    arrays = []
    for p in paths:
        if not p.endswith(".npy"):
            raise RunnerError(f"--input {p}: expected a .npy file (numpy.save)")
        try:
            arrays.append(np.load(p, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise RunnerError(f"--input {p}: {e}") from None
    return arrays


def _save(outputs: Sequence[np.ndarray], path: str) -> None:
    """``.npy`` for one output, ``.npz`` (``out0``, ``out1``, ...) for several; written atomically."""
    if len(outputs) > 1 and not path.endswith(".npz"):
        raise RunnerError(f"-o {path}: the model has {len(outputs)} outputs; write them to a .npz")
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".dcgraph-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".npz"):
                np.savez(f, **{f"out{i}": o for i, o in enumerate(outputs)})
            else:
                np.save(f, outputs[0])
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


DESCRIPTION = ("Run a model library written by `dcgraph compile -o LIB.so` with TVM's runtime only (no "
               "dcgraph, torch or TVM compiler needed): inputs from .npy files, outputs to .npy / .npz, "
               "optionally timed.")
EPILOG = ("LIB.so.json must sit beside LIB.so. A model compiled with --max-batch takes any batch size "
          "(run as its batch buckets); otherwise the compiled shapes only.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runner's arguments (``dcgraph run`` adds the same)."""
    parser.add_argument("library", metavar="LIB.so", help="the exported library")
    parser.add_argument("-i", "--input", action="append", required=True, metavar="X.npy",
                        help="an input array (numpy.save); once per model input, in order")
    parser.add_argument("-o", "--output", metavar="Y.npy", type=_output,
                        help="write the output (.npy, or .npz for several)")
    parser.add_argument("--time", action="store_true", help="time the model: median ms per call")
    parser.add_argument("--repeat", type=_positive, default=20, metavar="N",
                        help="timed calls with --time (default 20)")


def build_parser(prog: str = "runner.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    add_arguments(parser)
    return parser


def _output(text: str) -> str:
    if not text.endswith((".npy", ".npz")):
        raise argparse.ArgumentTypeError(f"{text!r} must end in .npy or .npz")
    if not Path(text).absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no such directory {str(Path(text).absolute().parent)!r}")
    return text


def _positive(text: str) -> int:
    # dcgraph.argtypes.positive's twin: this file imports nothing of dcgraph (it runs on devices)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    """What ``main`` does once the arguments are parsed (``dcgraph run`` calls this)."""
    arrays = _load_inputs(args.input)  # the output path was checked while parsing (_output)
    lib = Library(args.library)
    outputs = lib(*arrays)
    for i, o in enumerate(outputs):
        print(f"output {i}: shape {tuple(o.shape)} {o.dtype}, mean {float(np.mean(o)):.6g}")
    if args.time:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            lib(*arrays)
            times.append(time.perf_counter() - start)
        print(f"latency: {statistics.median(times) * 1e3:.3f} ms per call "
              f"(batch {arrays[0].shape[0] if arrays[0].ndim else 1}, median of {args.repeat})")
    if args.output:
        _save(outputs, args.output)
        print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "runner.py") -> int:
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # read when tvm is first imported
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except (RunnerError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
