"""TVM RPC plumbing for tuning on remote devices: tracker queries that never hang, and the
tracker / server processes dcgraph starts itself (tests, benchmarks, a quick local fleet).

A fleet is TVM's stock pieces: ``python -m tvm.exec.rpc_tracker`` on one machine and
``python -m tvm.exec.rpc_server --tracker HOST:PORT --key NAME`` on every device (the
emulated arm64 server of :mod:`.arm_server` registers the same way). :mod:`..tuning` builds
kernels on this machine and asks the tracker for a device of the key for each measurement.

TVM's own client blocks where a tuning loop must not: ``connect_tracker`` retries a refused
connection for a minute and ``TrackerSession.request`` waits forever while no server of the key
is free. :func:`request_session` asks the tracker's summary first (a socket with a timeout),
fails at once when no server of the key is registered, and gives up on a request that is not
served within ``timeout`` seconds. Errors are :class:`DeviceUnavailable`, one line each.

:class:`RpcProcess` runs one such program as a subprocess (its own process group, killed on
exit); :class:`Tracker` and :class:`Server` are the stock modules on this machine and
:class:`.arm_server.ArmRpcServer` the stock server under the emulated arm64 Python. They listen
on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DeviceUnavailable

__all__ = ["DeviceUnavailable", "RpcProcess", "Server", "Tracker", "count_servers", "free_port",
           "parse_address", "registered", "request_session", "stop_process_group", "tracker_summary"]


def stop_process_group(proc: subprocess.Popen, signals: Sequence[int] = (signal.SIGTERM, signal.SIGKILL),
                       ) -> None:
    """Send each signal to ``proc``'s process group (a server started with ``start_new_session``:
    its forked session workers too, nothing else) and wait up to 5 s after each; the SIGKILL
    reaches workers the leader left behind when it exited on SIGTERM."""
    for sig in signals:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    deadline = time.monotonic() + 5.0  # a killed worker may take a moment to die: wait for it
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, left for init to reap, do not)."""
    proc_fs = Path("/proc")
    if not proc_fs.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc_fs.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def parse_address(addr: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``."""
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"an RPC tracker address is 'host:port', got {addr!r}")
    return host, int(port)


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict[str, Any]:
    """The tracker's summary (``queue_info``, ``server_info``) over a socket with a timeout."""
    from tvm.rpc import base

    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise DeviceUnavailable(f"{host}:{port} answers, but is not a TVM RPC tracker")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            code, summary = base.recvjson(sock)
    except (OSError, struct.error) as exc:
        raise DeviceUnavailable(f"RPC tracker {host}:{port} is not reachable ({exc})") from None
    if code != base.TrackerCode.SUCCESS:
        raise DeviceUnavailable(f"RPC tracker {host}:{port} refused a summary (code {code})")
    return summary


def count_servers(summary: dict[str, Any], key: str) -> int:
    """How many servers of ``key`` are registered (free or busy) in a tracker summary."""
    return sum(1 for info in summary.get("server_info", [])
               if str(info.get("key", "")).partition(":")[2] == key)


def request_session(host: str, port: int, key: str, *, timeout: float = 60.0,
                    session_timeout: float = 0) -> Any:
    """A ``tvm.rpc`` session on a device of ``key``: fails at once when the tracker is down or
    has no server of the key, and after ``timeout`` seconds when none becomes free."""
    from tvm import rpc

    summary = tracker_summary(host, port)
    if count_servers(summary, key) == 0:
        keys = sorted({str(i.get("key", "")).partition(":")[2] for i in summary.get("server_info", [])})
        raise DeviceUnavailable(f"no RPC server with key {key!r} is registered at tracker {host}:{port} "
                                f"(registered keys: {', '.join(keys) or 'none'})")
    box: dict[str, Any] = {}

    def ask() -> None:
        try:
            box["session"] = rpc.connect_tracker(host, port).request(
                key, priority=1, session_timeout=session_timeout, max_retry=2)
        except Exception as exc:  # reported below, in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise DeviceUnavailable(f"no server with key {key!r} became free at tracker {host}:{port} "
                                f"within {timeout:.0f} s")
    if "error" in box:
        last = [ln for ln in str(box["error"]).strip().splitlines() if ln.strip()]
        raise DeviceUnavailable(f"cannot open a session on a {key!r} device via {host}:{port}: "
                                f"{last[-1] if last else type(box['error']).__name__}")
    return box["session"]


def free_port(host: str) -> int:
    """A TCP port nobody listens on at ``host`` right now (another process may take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(text: str | bytes | None, lines: int = 15) -> str:
    """The last ``lines`` lines of a process's output."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


class RpcProcess:
    """A TVM RPC program run as a subprocess in its own process group, its output in a log file.

    Subclasses give :meth:`_command` and :meth:`_ready` (and may read start-up failures from the
    log in :meth:`_failure`). :meth:`start` waits until the process is ready, picks another free
    port when the first one was taken before the process bound it, and raises :attr:`error`
    with the log's last lines when it exits or is not ready in ``timeout`` seconds. The whole
    process group (the server's forked session workers too) is killed on :meth:`stop`, on
    leaving the ``with`` block and at interpreter exit.
    """

    name = "process"
    error: type[Exception] = DeviceUnavailable

    def __init__(self, host: str, port: int | None, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self._logdir: Path | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def _failure(self, log: str) -> str | None:
        """A start-up failure the log shows before the process exits (None: none yet)."""
        return None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """The process's combined stdout/stderr while it runs."""
        return self._logdir / "log.txt" if self._logdir else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the process printed."""
        return tail(self.log(), lines)

    def start(self) -> None:
        """Start the process and wait (up to ``timeout`` s) until it is ready."""
        if self.proc is not None:
            return
        auto_port = self.port is None
        for attempt in range(3):
            if auto_port:
                self.port = free_port(self.host)
            try:
                self._launch()
                return
            except self.error as exc:  # another process took the free port first: try another
                if not (auto_port and attempt < 2 and "cannot bind to any port" in str(exc)):
                    raise

    def _launch(self) -> None:
        self._logdir = Path(tempfile.mkdtemp(prefix=f"dcgraph-{self.name.replace(' ', '-')}-"))
        t0 = time.monotonic()
        with open(self._logdir / "log.txt", "wb") as logf:
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, cwd=self._logdir, env=self._env(),
                                         start_new_session=True)
        atexit.register(self.stop)
        try:
            while not self._ready():
                rc = self.proc.poll()
                if rc is not None:
                    raise self.error(f"the {self.name} on {self.address} exited with code {rc} during "
                                     f"start-up; its output:\n{self.log_tail()}")
                why = self._failure(self.log())
                if why is not None:
                    raise self.error(f"{why}:\n{self.log_tail()}")
                if time.monotonic() > t0 + self.timeout:
                    raise self.error(f"the {self.name} on {self.address} was not ready after "
                                     f"{self.timeout:.0f} s; its output:\n{self.log_tail() or '(none)'}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process group (the server's forked session workers too), keep the log."""
        if self.proc is not None:
            stop_process_group(self.proc, (sig,))

    def stop(self) -> None:
        """Kill the whole process group and remove the log (idempotent)."""
        proc, self.proc = self.proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            stop_process_group(proc)
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None


def registered(summary: dict[str, Any], key: str, port: int | None) -> bool:
    """Whether a tracker summary lists a server of ``key`` listening on ``port``."""
    return any(int((i.get("addr") or [None, 0])[1] or 0) == port
               and str(i.get("key", "")).partition(":")[2] == key
               for i in summary.get("server_info", []))


class Tracker(RpcProcess):
    """``python -m tvm.exec.rpc_tracker`` on ``host:port`` (127.0.0.1 and a free port by default)."""

    name = "RPC tracker"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0) -> None:
        super().__init__(host, port, timeout)

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", self.host, "--port", str(self.port),
                "--port-end", str(self.port + 1)]

    def _ready(self) -> bool:
        try:
            tracker_summary(self.host, self.port, timeout=1)
        except DeviceUnavailable:
            return False
        return True

    def summary(self) -> dict[str, Any]:
        return tracker_summary(self.host, self.port)


class Server(RpcProcess):
    """``python -m tvm.exec.rpc_server`` registered with ``tracker`` under ``key`` (this machine's CPU).

    :meth:`sessions` counts the sessions it served, from its log."""

    name = "RPC server"

    def __init__(self, tracker: str, key: str, host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = 60.0) -> None:
        super().__init__(host, port, timeout)
        self.tracker = parse_address(tracker)
        self.key = key

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "tvm.exec.rpc_server", "--host", self.host, "--port", str(self.port),
                "--port-end", str(self.port + 1), "--tracker", f"{self.tracker[0]}:{self.tracker[1]}",
                "--key", self.key]

    def _ready(self) -> bool:
        try:
            return registered(tracker_summary(*self.tracker, timeout=1), self.key, self.port)
        except DeviceUnavailable:
            return False

    def sessions(self) -> int:
        return self.log().count("connected from")
