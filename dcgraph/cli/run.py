"""``dcgraph run``: an exported library on TVM's runtime alone, here or on the emulated ARM board.

The work is done by ``backends/tvm/runner.py``, the file a user copies to a device: it is loaded
from its file here (the ``dcgraph.backends.tvm`` package would load TVM's compiler), and for an
aarch64 library the same file runs under the emulated arm64 Python, which has TVM's runtime and
numpy but neither dcgraph nor torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType


def runner_path() -> Path:
    """Where ``runner.py`` is installed (``dcgraph/backends/tvm/runner.py``)."""
    backends = importlib.util.find_spec("dcgraph.backends")  # its package imports nothing
    assert backends is not None and backends.submodule_search_locations
    return Path(next(iter(backends.submodule_search_locations))) / "tvm" / "runner.py"


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dcgraph_standalone_runner", runner_path())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_parser(sub: argparse._SubParsersAction) -> None:
    runner = _runner()
    rp = sub.add_parser(
        "run", help="run an exported library with TVM's runtime only (x86 here, aarch64 under qemu)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=runner.DESCRIPTION + " An aarch64 library runs on the emulated ARM board "
                                         "(qemu-user, an arm64 Python with TVM's runtime and numpy only).",
        epilog=runner.EPILOG + f"\nOn a device without dcgraph, copy {runner_path()} next to the "
                               "library and run `python runner.py LIB.so -i X.npy -o Y.npy`.")
    runner.add_arguments(rp)
    rp.set_defaults(run=run)


def _is_aarch64(library: str) -> bool:
    side = Path(library + ".json")
    try:
        target = json.loads(side.read_text()).get("target", {})
    except (OSError, ValueError):
        return False  # the runner explains what is wrong with it
    return "aarch64" in str(target.get("mtriple", ""))


def run(args: argparse.Namespace) -> int:
    import platform

    if not (_is_aarch64(args.library) and platform.machine() != "aarch64"):
        import os

        if "tvm" not in sys.modules:
            os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime alone, as on a device
        runner = _runner()
        try:
            return runner.run(args)
        except runner.RunnerError as e:
            raise ValueError(str(e)) from None
    from dcgraph.backends.tvm import remote

    root = remote.ensure_arm_root(progress=lambda m: print(m, file=sys.stderr))
    argv = [str(root.python), str(runner_path()), args.library, "--repeat", str(args.repeat)]
    for x in args.input:
        argv += ["-i", x]
    argv += ["-o", args.output] * bool(args.output) + ["--time"] * args.time
    print("running on the emulated ARM board (qemu-user, TVM's aarch64 runtime) ...", file=sys.stderr)
    res = subprocess.run(argv, env=root.env(), capture_output=True, text=True, check=False, timeout=1800)
    sys.stdout.write(res.stdout)
    if args.time and res.returncode == 0:
        print("(timed under qemu emulation: not a measure of an ARM board's speed)")
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        raise ValueError(lines[-1].removeprefix("runner.py: error: ") if lines else
                         f"the emulated runner exited with {res.returncode}")
    return 0
