"""TVM's stock RPC server under the emulated aarch64 Python: an ARM device on this machine.

:class:`ArmRpcServer` is one kind of :class:`.rpc.RpcProcess` (the same life cycle, port
handling and log as the host's tracker and server) whose command is ``python -m
tvm.exec.rpc_server`` run by the launcher of an :class:`.arm_root.ArmRoot`. The host compiles
for :data:`ARM_TARGET` (the ``arm`` preset of :mod:`..targets`), links with
:func:`cross_compiler` and talks RPC. The calls seen working with TVM 0.27
(``tests/backends/test_arm_emulation.py`` runs them)::

    from dcgraph.backends.tvm.remote import ArmRpcServer, arm_target, cross_compiler, ensure_arm_root

    root = ensure_arm_root()                  # ~25 s the first time (+ apt), ~1 ms afterwards
    with ArmRpcServer(root) as server:        # ~10 s: the emulated Python imports TVM
        remote = server.connect()             # a tvm.rpc RPCSession
        lib = tvm.compile(te.create_prim_func([A, B, C]), target=ARM_TARGET)
        lib.export_library("/tmp/add.so", fcompile=cross_compiler())
        remote.upload("/tmp/add.so")          # lands in the server's per-session temp dir
        f = remote.load_module("add.so")      # the file name only, not the host path
        f["main"](tvm.runtime.tensor(a, remote.cpu()), ...)   # TE prim funcs are called "main"

        ex = tvm.compile(relax_mod, target=arm_target())      # Relax needs a Target, not a dict
        vm = relax.VirtualMachine(load_on_remote(remote, ex, "model.so"), remote.cpu())

With a tracker, ``ArmRpcServer(root, tracker="host:9190", key="arm64")`` registers there and
``.connect()`` requests the device through it. Gotchas: the server's worker is spawned through
``sys.executable``, which must be the launcher (a ``sitecustomize.py`` in the root sets it);
every Python start under qemu costs seconds, so keep one server per test module;
MetaSchedule on this target also needs ``"num-cores"`` in the target.
"""

from __future__ import annotations

import logging
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ArmRpcError, DeviceUnavailable
from ..targets import ARM as ARM_TARGET
from .arm_root import CROSS_CC, ArmRoot, ensure_arm_root
from .rpc import RpcProcess, parse_address, registered, tracker_summary

__all__ = ["ARM_TARGET", "ArmRpcError", "ArmRpcServer", "arm_target", "cross_compiler", "load_on_remote"]

log = logging.getLogger(__name__)


def cross_compiler() -> Callable[..., Any]:
    """The ``fcompile`` for ``export_library`` of modules built for :data:`ARM_TARGET`."""
    from tvm.support import cc

    return cc.cross_compiler(CROSS_CC)


def arm_target(**extra: Any) -> Any:
    """:data:`ARM_TARGET` (plus ``extra`` keys, e.g. ``**{"num-cores": 2}``) as a ``tvm.target.Target``.

    TVM 0.27's ``tvm.compile`` of a *Relax* module needs this: given the plain dict it fails
    with ``TypeError: argument of type 'builtin_function_or_method' is not iterable``
    (``relax/vm_build.py`` reads ``target.keys``). TE/TIR modules accept either.
    """
    import tvm

    return tvm.target.Target({**ARM_TARGET, **extra})


def load_on_remote(remote: Any, module: Any, name: str = "kernel.so") -> Any:
    """Export ``module`` (a ``tvm.compile`` result for :data:`ARM_TARGET`: a TE/TIR library or a
    Relax ``VMExecutable``) with the cross compiler, upload it to ``remote`` and load it there.

    For a Relax executable wrap the result: ``relax.VirtualMachine(mod, remote.cpu())``.
    """
    with tempfile.TemporaryDirectory(prefix="dcgraph-arm-") as tmp:
        path = Path(tmp) / name
        module.export_library(str(path), fcompile=cross_compiler())
        remote.upload(str(path))
    return remote.load_module(name)


class ArmRpcServer(RpcProcess):
    """TVM's stock RPC server running under the emulated aarch64 Python (a context manager).

    ``with ArmRpcServer() as server: remote = server.connect()``. Without ``tracker`` the server
    listens on ``host:port`` (127.0.0.1 and a free port by default). With ``tracker="host:port"``
    and ``key`` it also registers with that RPC tracker, and :meth:`connect` goes through it. The
    server and all its workers form one process group, killed on exit.
    """

    name = "ARM RPC server"
    error = ArmRpcError

    def __init__(self, root: ArmRoot | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 tracker: str | None = None, key: str | None = None, timeout: float = 60.0,
                 custom_addr: str | None = None) -> None:
        super().__init__(host, port, timeout)
        self.tracker: tuple[str, int] | None = None
        if tracker is not None:
            self.tracker = parse_address(tracker)
            if not key:
                raise ValueError("a key is needed to register with a tracker (key='arm64', say)")
        self.arm_root = root
        self.key = key or ""
        self.custom_addr = custom_addr

    def start(self) -> None:
        """Start the server and wait (up to ``timeout`` s) until it accepts connections."""
        if self.proc is not None:
            return
        if self.tracker is not None:
            try:
                tracker_summary(*self.tracker, timeout=3)
            except DeviceUnavailable as exc:
                raise ArmRpcError(f"{exc}; start one (python -m tvm.exec.rpc_tracker --host 0.0.0.0 "
                                  f"--port {self.tracker[1]}) or fix the address") from None
        if self.arm_root is None:
            self.arm_root = ensure_arm_root()
        if self.port is not None:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
                    s.bind((self.host, self.port))
            except OSError as exc:
                raise ArmRpcError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        super().start()
        log.info("ARM RPC server on %s after %.1f s", self.address, self.start_seconds or 0.0)

    def _command(self) -> list[str]:
        assert self.arm_root is not None and self.port is not None
        cmd = [str(self.arm_root.python), "-m", "tvm.exec.rpc_server", "--host", self.host,
               "--port", str(self.port), "--port-end", str(self.port + 1)]
        if self.tracker is not None:
            cmd += ["--tracker", f"{self.tracker[0]}:{self.tracker[1]}", "--key", self.key]
            if self.custom_addr:
                cmd += ["--custom-addr", self.custom_addr]
        return cmd

    def _failure(self, log: str) -> str | None:
        text = "\n".join(log.strip().splitlines()[-60:])
        if self.tracker is not None and ("Cannot connect to tracker" in text or "is not RPC Tracker" in text):
            return f"the ARM RPC server cannot register with tracker {self.tracker[0]}:{self.tracker[1]}"
        if "Traceback" in text:
            return "the ARM RPC server failed during start-up"
        return None

    def _ready(self) -> bool:
        if self.tracker is None:
            return self._answers()
        try:
            return registered(tracker_summary(*self.tracker, timeout=3), self.key, self.port)
        except DeviceUnavailable:
            return False

    def connect(self, session_timeout: float = 0) -> Any:
        """A ``tvm.rpc`` session on the emulated CPU (through the tracker when there is one)."""
        from tvm import rpc

        if self.proc is None:
            raise ArmRpcError("the ARM RPC server is not running (use it as a context manager)")
        if self.tracker is not None:
            return rpc.connect_tracker(*self.tracker).request(self.key, session_timeout=session_timeout)
        return rpc.connect(self._probe_host, self.port, key=self.key, session_timeout=session_timeout)

    @property
    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def _answers(self) -> bool:
        """Whether a TVM RPC server answers on our port (not just anything that listens there).

        The probe offers a key the server does not expect: the server answers "mismatch", logs a
        warning, closes the connection and keeps serving; no session is started.
        """
        from tvm.rpc import base

        probe = b"client:dcgraph-readiness-probe"
        try:
            with socket.create_connection((self._probe_host, self.port), timeout=5) as sock:
                sock.sendall(struct.pack("<ii", base.RPC_MAGIC, len(probe)) + probe)
                code = struct.unpack("<i", base.recvall(sock, 4))[0]
        except OSError:
            return False
        return code in (base.RPC_CODE_MISMATCH, base.RPC_CODE_SUCCESS)
