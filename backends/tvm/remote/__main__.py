"""``python -m dcgraph.backends.tvm.remote`` (``make arm-setup``): build (or check) the emulated
arm64 root and the instruction counter (:mod:`.arm_count`: qemu-user with plugins, the counting
plugin, ONNX Runtime's aarch64 wheel); ``--smoke`` then runs a vector add on the emulated CPU
over RPC."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import EmulationUnavailable
from .arm_root import ArmRoot, Progress, ensure_arm_root
from .arm_server import ARM_TARGET, ArmRpcServer, load_on_remote


def _smoke(arm_root: ArmRoot, say: Progress) -> None:
    """Vector add on the emulated CPU, checked against numpy."""
    import numpy as np
    import tvm
    from tvm import te

    n = 1024
    a_ph, b_ph = te.placeholder((n,), name="A"), te.placeholder((n,), name="B")
    c_op = te.compute((n,), lambda i: a_ph[i] + b_ph[i], name="C")
    lib = tvm.compile(te.create_prim_func([a_ph, b_ph, c_op]), target=ARM_TARGET)
    with ArmRpcServer(arm_root) as server:
        say(f"smoke: RPC server up in {server.start_seconds:.1f} s")
        remote = server.connect()
        dev = remote.cpu()
        f = load_on_remote(remote, lib, "smoke_add.so")
        a, b = np.random.rand(n).astype("float32"), np.random.rand(n).astype("float32")
        c = tvm.runtime.empty((n,), "float32", dev)
        t0 = time.monotonic()
        f["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev), c)
        np.testing.assert_allclose(c.numpy(), a + b, rtol=1e-6)
        say(f"smoke: vector add on emulated aarch64 matches numpy ({time.monotonic() - t0:.2f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dcgraph.backends.tvm.remote``: build (or check) the arm64 root."""
    parser = argparse.ArgumentParser(
        prog="python -m dcgraph.backends.tvm.remote",
        description="Set up emulated aarch64 execution for TVM kernels: qemu-user, the aarch64 cross "
                    "gcc, an arm64 Python 3.11 with TVM. Idempotent; the first run downloads ~250 MB.")
    parser.add_argument("--root", type=Path, default=None,
                        help="where to build it (default: $DCGRAPH_ARM_ROOT or ~/.cache/dcgraph/arm64)")
    parser.add_argument("--smoke", action="store_true",
                        help="then start an RPC server and run a vector add on the emulated CPU")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--no-count", action="store_true",
                        help="skip the instruction counter (plugin-capable qemu, ONNX Runtime for aarch64)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    try:
        arm_root = ensure_arm_root(args.root, progress=say)
    except EmulationUnavailable as exc:
        print(f"ARM emulation unavailable: {exc}", file=sys.stderr)
        return 2
    say(f"ready: {arm_root.root} (launcher {arm_root.python})")
    if not args.no_count:
        from .arm_count import ensure_counter

        try:
            counter = ensure_counter(arm_root, progress=say)
        except EmulationUnavailable as exc:
            print(f"ARM instruction counting unavailable: {exc}", file=sys.stderr)
            return 2
        say(f"instruction counter ready: {counter.qemu} with {counter.plugin.name}")
    if args.smoke:
        _smoke(arm_root, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
