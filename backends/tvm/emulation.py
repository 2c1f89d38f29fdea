"""Run TVM kernels on an emulated aarch64 CPU: qemu-user + an arm64 Python + TVM's stock RPC server.

No ARM board, chroot or binfmt_misc is needed. :func:`ensure_arm_root` builds (once, then
cached) a private directory with Debian's arm64 ``python3.11`` and its library closure, PyPI's
``manylinux_2_28_aarch64`` wheels of TVM, and a launcher script that runs that Python under
``qemu-aarch64-static``. :class:`ArmRpcServer` starts ``python -m tvm.exec.rpc_server`` with it;
the host compiles for :data:`ARM_TARGET`, links with :func:`cross_compiler` and talks RPC.

The calls seen working with TVM 0.27 (``tests/backends/test_arm_emulation.py`` runs them)::

    import numpy as np
    import tvm
    from tvm import relax, te
    from dcgraph.backends.tvm.emulation import (ARM_TARGET, ArmRpcServer, arm_target,
                                                cross_compiler, ensure_arm_root)

    root = ensure_arm_root()                  # ~25 s the first time (+ apt), ~1 ms afterwards
    with ArmRpcServer(root) as server:        # ~10 s: the emulated Python imports TVM
        remote = server.connect()             # a tvm.rpc RPCSession
        dev = remote.cpu()

        # a TE kernel
        A = te.placeholder((n,), name="A"); B = te.placeholder((n,), name="B")
        C = te.compute((n,), lambda i: A[i] + B[i], name="C")
        lib = tvm.compile(te.create_prim_func([A, B, C]), target=ARM_TARGET)
        lib.export_library("/tmp/add.so", fcompile=cross_compiler())
        remote.upload("/tmp/add.so")          # lands in the server's per-session temp dir
        f = remote.load_module("add.so")      # the file name only, not the host path
        a = tvm.runtime.tensor(np_a, dev)     # host numpy -> remote memory
        c = tvm.runtime.empty((n,), "float32", dev)
        f["main"](a, b, c)                    # TE prim funcs are called "main"
        out = c.numpy()                       # remote memory -> host numpy

        # a Relax module (whole models go this way)
        ex = tvm.compile(relax_mod, target=arm_target())      # a Target: a dict fails here
        ex.export_library("/tmp/model.so", fcompile=cross_compiler())
        remote.upload("/tmp/model.so")
        vm = relax.VirtualMachine(remote.load_module("model.so"), dev)
        out = vm["main"](tvm.runtime.tensor(x, dev), ...).numpy()

:func:`load_on_remote` does the export/upload/load triple in one call. With a tracker,
``ArmRpcServer(root, tracker="host:9190", key="arm64")`` registers there and ``.connect()``
requests the device through it.

Gotchas: the server's worker is spawned through ``sys.executable``, which must be the launcher
(a ``sitecustomize.py`` in the root sets it); every Python start under qemu costs seconds, so
keep one server per test module; ``TVM_USE_RUNTIME_LIB=1`` (set by the launcher) halves the
emulated ``import tvm``; MetaSchedule on this target also needs ``"num-cores"`` in the target.

Run ``python -m dcgraph.backends.tvm.emulation`` (``make arm-setup``) to build the root ahead of time.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .rpc import stop_process_group

if TYPE_CHECKING:
    import tvm

__all__ = [
    "ARM_TARGET",
    "ArmRoot",
    "ArmRpcError",
    "ArmRpcServer",
    "EmulationUnavailable",
    "arm_target",
    "cross_compiler",
    "default_root",
    "ensure_arm_root",
    "load_on_remote",
]

log = logging.getLogger(__name__)

#: TVM target for a 64-bit ARM CPU with NEON (Cortex-A72, what qemu emulates here). MetaSchedule
#: also wants ``"num-cores"``: use ``{**ARM_TARGET, "num-cores": n}`` there.
ARM_TARGET: dict[str, Any] = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a72",
    "mattr": ["+neon"],
}

CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64-static"
QEMU_CPU = "cortex-a72"
HOST_PACKAGES = ("qemu-user-static", "gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross")
#: without libc6-dev-arm64-cross (not pulled by --no-install-recommends) linking fails on crti.o
CROSS_CRTI = Path("/usr/aarch64-linux-gnu/lib/crti.o")
PY_VERSION = "3.11"
#: arm64 Debian packages unpacked into the root, with their dependency closure;
#: libstdc++6 is for libtvm_runtime.so, which python3.11 does not pull in.
ARM_DEBS = (f"python{PY_VERSION}", "libstdc++6")
#: Bump when the layout of the root changes: older roots are rebuilt.
RECIPE = 1
STAMP = ".dcgraph-arm-root.json"
DISK_NEEDED = 1_500_000_000  # root ~0.5 GB + pip's unpacking + apt lists
_TVM_DEFAULTS = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"}

Progress = Callable[[str], None]


class EmulationUnavailable(RuntimeError):
    """ARM emulation cannot be set up on this machine; ``str(exc)`` is a one-line reason."""


class ArmRpcError(RuntimeError):
    """The emulated RPC server failed to start or to register with its tracker."""


@dataclass(frozen=True)
class ArmRoot:
    """A ready arm64 root: ``python`` runs the emulated Python 3.11 with TVM importable."""

    root: Path
    python: Path

    @property
    def site_packages(self) -> Path:
        """Where the aarch64 wheels are installed."""
        return self.root / "site-packages"

    def env(self) -> dict[str, str]:
        """Environment for running the root's binaries directly (the launcher sets the same).

        It is ``os.environ`` plus the qemu and Python variables, so it can go straight to
        ``subprocess.run(..., env=arm_root.env())``.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONSTARTUP")}
        env.update({
            "QEMU_LD_PREFIX": str(self.root),
            "QEMU_CPU": os.environ.get("QEMU_CPU", QEMU_CPU),
            "PYTHONPATH": f"{self.root / 'lib-dcgraph'}:{self.site_packages}",
            "PYTHONNOUSERSITE": "1",
            "TVM_USE_RUNTIME_LIB": os.environ.get("TVM_USE_RUNTIME_LIB", "1"),
            "DCGRAPH_ARM_PYTHON": str(self.python),
        })
        return env


# --------------------------------------------------------------------------------------------
# set-up


def default_root() -> Path:
    """``$DCGRAPH_ARM_ROOT``, else ``~/.cache/dcgraph/arm64``."""
    env = os.environ.get("DCGRAPH_ARM_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dcgraph" / "arm64"


def _tvm_pins() -> dict[str, str]:
    """The host's TVM versions (the RPC protocol must match), else the project's pins."""
    pins = {}
    for dist, default in _TVM_DEFAULTS.items():
        try:
            pins[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pins[dist] = default
    return pins


def _tail(text: str | bytes | None, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _oneline(text: str | None, lines: int = 3) -> str:
    """The last ``lines`` non-empty lines of ``text`` joined into one line (for exception reasons)."""
    return " | ".join([ln.strip() for ln in _tail(text, 50).splitlines() if ln.strip()][-lines:])


def _run(cmd: Sequence[str | Path], *, timeout: float = 900, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; never raises on a non-zero exit."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _host_tools_missing() -> list[str]:
    missing = [tool for tool in (QEMU, CROSS_CC) if shutil.which(tool) is None]
    if not CROSS_CRTI.exists():
        missing.append(str(CROSS_CRTI))
    return missing


def _ensure_host_tools(progress: Progress) -> None:
    """qemu-user-static and the aarch64 cross gcc on the host, installed with apt if missing."""
    missing = _host_tools_missing()
    if not missing:
        return
    hint = "install " + " ".join(HOST_PACKAGES)
    if shutil.which("apt-get") is None:
        raise EmulationUnavailable(f"{', '.join(missing)} missing and apt-get is not available: {hint}")
    if os.geteuid() != 0:
        raise EmulationUnavailable(f"{', '.join(missing)} missing and not root (apt-get needs root): "
                                   f"sudo apt-get {hint}")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *HOST_PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    progress(f"host: apt-get install {' '.join(HOST_PACKAGES)}")
    res = _run(install, env=env)
    if res.returncode != 0:
        progress("host: install failed, running apt-get update and retrying")
        upd = _run(["apt-get", "update"], env=env)
        res = _run(install, env=env)
        if res.returncode != 0:
            reason = _oneline(res.stderr or res.stdout) or _oneline(upd.stderr)
            raise EmulationUnavailable(f"apt-get install {' '.join(HOST_PACKAGES)} failed "
                                       f"(network or apt sources?): {reason}")
    still = _host_tools_missing()
    if still:
        raise EmulationUnavailable(f"still missing after apt-get install: {', '.join(still)}")


def _read_stamp(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _stamp_ok(root: Path, want: dict[str, Any]) -> bool:
    stamp = _read_stamp(root)
    if stamp is None or any(stamp.get(k) != v for k, v in want.items()):
        return False
    return (root / "bin" / "python3").is_file() and Path(stamp.get("qemu", "")).is_file()


def _want_stamp() -> dict[str, Any]:
    return {"recipe": RECIPE, "python": PY_VERSION, **_tvm_pins()}


def _apt_options(apt_dir: Path) -> list[str]:
    """apt-get options for a private arm64 package state: the host's dpkg is left alone."""
    for sub in ("lists/partial", "archives/partial", "cache", "state"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "status").touch()
    opts = {
        "APT::Architecture": "arm64",
        "Dir::State": apt_dir / "state",
        "Dir::State::Lists": apt_dir / "lists",
        "Dir::State::status": apt_dir / "status",
        "Dir::Cache": apt_dir / "cache",
        "Dir::Cache::archives": apt_dir / "archives",
        "Dir::Cache::pkgcache": "",
        "Dir::Cache::srcpkgcache": "",
    }
    if os.geteuid() == 0:  # apt drops to the _apt user for downloads, who cannot write in /root
        opts["APT::Sandbox::User"] = "root"
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def _fetch_python_debs(tmp: Path, progress: Progress) -> None:
    """arm64 python3.11 and its library closure, unpacked into ``tmp`` with dpkg-deb -x."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(f"{tool} not found: the arm64 Python comes from Debian packages")
    apt_dir = tmp / "_apt"
    opts = _apt_options(apt_dir)
    progress("arm64: apt-get update (private state, arm64 lists only)")
    upd = _run(["apt-get", *opts, "update"])
    progress("arm64: resolving the python3.11 closure")
    sim = _run(["apt-get", *opts, "install", "-s", "-y", "--no-install-recommends", *ARM_DEBS])
    names = [line.split()[1] for line in sim.stdout.splitlines() if line.startswith("Inst ")]
    if sim.returncode != 0 or not names:
        if upd.returncode != 0 or not any((apt_dir / "lists").glob("*_Packages*")):
            # apt-get update exits 0 when every fetch failed: it only warns
            raise EmulationUnavailable(f"apt-get update of the arm64 package lists failed (network?): "
                                       f"{_oneline(upd.stderr, 2)}")
        raise EmulationUnavailable(f"no arm64 {' '.join(ARM_DEBS)} in this host's apt sources "
                                   f"(not Debian 12?): {_oneline(sim.stderr, 2)}")
    debs = apt_dir / "debs"
    debs.mkdir()
    progress(f"arm64: apt-get download {len(names)} packages")
    dl = _run(["apt-get", *opts, "download", *names], cwd=debs)
    files = sorted(debs.glob("*.deb"))
    if dl.returncode != 0 or len(files) < len(names):
        raise EmulationUnavailable(f"apt-get download of arm64 packages failed (network?): "
                                   f"{_oneline(dl.stderr)}")
    progress(f"arm64: unpacking {len(files)} .debs ({sum(f.stat().st_size for f in files) / 1e6:.0f} MB)")
    for deb in files:
        res = _run(["dpkg-deb", "-x", deb, tmp])
        if res.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {deb.name} failed: {_tail(res.stderr, 3)}")
    shutil.rmtree(apt_dir)
    # Absolute paths the emulated Python opens are looked up in the root first and on the host
    # second: empty dist-packages dirs keep the host's x86 packages off its sys.path.
    for sub in (f"usr/local/lib/python{PY_VERSION}/dist-packages", "usr/lib/python3/dist-packages"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)


def _pip_install_tvm(tmp: Path, pins: dict[str, str], progress: Progress) -> None:
    """The aarch64 TVM wheels (and what the RPC server imports), installed by the host's pip."""
    reqs = [f"apache-tvm[rpc]=={pins['apache-tvm']}", f"apache-tvm-ffi=={pins['apache-tvm-ffi']}",
            "cloudpickle", "psutil"]
    progress(f"arm64: pip install {' '.join(reqs)} (manylinux_2_28_aarch64 wheels)")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "--no-warn-conflicts", "--progress-bar", "off", "--target", tmp / "site-packages",
           "--platform", "manylinux_2_28_aarch64", "--only-binary=:all:", "--python-version", PY_VERSION,
           "--implementation", "cp", *reqs]
    res = _run(cmd, env={**os.environ, "PIP_USER": "0"})
    if res.returncode != 0:
        net = [ln for ln in res.stderr.splitlines()
               if any(w in ln for w in ("ProxyError", "ConnectionError", "NewConnectionError", "SSLError",
                                        "Temporary failure", "Network is unreachable", "timed out"))]
        raise EmulationUnavailable(f"pip could not fetch the aarch64 TVM wheels (network, or no "
                                   f"manylinux_2_28_aarch64 wheel of apache-tvm=={pins['apache-tvm']}): "
                                   f"{net[-1].strip()[:300] if net else _oneline(res.stderr, 2)}")


_LAUNCHER = """\
#!/bin/sh
# aarch64 Python {py} under qemu-user, written by dcgraph.backends.tvm.emulation.
# Relocatable: everything is found relative to this file.
root=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd -P)
export QEMU_LD_PREFIX="$root"
export QEMU_CPU="${{QEMU_CPU:-{cpu}}}"
export PYTHONPATH="$root/lib-dcgraph:$root/site-packages"
export PYTHONNOUSERSITE=1
export TVM_USE_RUNTIME_LIB="${{TVM_USE_RUNTIME_LIB:-1}}"
export DCGRAPH_ARM_PYTHON="$root/bin/python3"
unset PYTHONHOME PYTHONSTARTUP
exec "${{DCGRAPH_QEMU:-{qemu}}}" "$root/usr/bin/python{py}" "$@"
"""

_SITECUSTOMIZE = '''\
"""Written by dcgraph.backends.tvm.emulation: child Pythons (TVM's PopenWorker, multiprocessing
spawn) start through sys.executable, which must be the qemu launcher, not the aarch64 binary."""
import os
import sys

if os.environ.get("DCGRAPH_ARM_PYTHON"):
    sys.executable = os.environ["DCGRAPH_ARM_PYTHON"]
'''

_VERIFY = """\
import json, platform, subprocess, sys
import numpy, tvm, tvm.rpc
child = subprocess.run([sys.executable, "-S", "-c", "import platform; print(platform.machine())"],
                       capture_output=True, text=True)
print(json.dumps({"machine": platform.machine(), "tvm": tvm.__version__, "numpy": numpy.__version__,
                  "python": platform.python_version(), "child": child.stdout.strip()}))
"""


def _write_launcher(tmp: Path, qemu: str) -> Path:
    (tmp / "bin").mkdir(exist_ok=True)
    launcher = tmp / "bin" / "python3"
    launcher.write_text(_LAUNCHER.format(py=PY_VERSION, cpu=QEMU_CPU, qemu=qemu))
    launcher.chmod(0o755)
    (tmp / "lib-dcgraph").mkdir(exist_ok=True)
    (tmp / "lib-dcgraph" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return launcher


def _verify(launcher: Path, pins: dict[str, str], progress: Progress) -> dict[str, Any]:
    progress("arm64: checking the emulated Python imports TVM")
    res = _run([launcher, "-c", _VERIFY], timeout=300)
    try:
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"the emulated Python failed (rc {res.returncode}): {_tail(res.stderr)}") from None
    if info["machine"] != "aarch64" or info["child"] != "aarch64" or info["tvm"] != pins["apache-tvm"]:
        raise RuntimeError(f"unexpected emulated Python: {info}")
    return info


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock: concurrent callers (pytest-xdist, two shells) build the root once."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_arm_root(root: Path | None = None, progress: Progress | None = None) -> ArmRoot:
    """Return a ready arm64 root, building it first if needed (idempotent; < 1 s when cached).

    Installs the host tools with apt if missing (~20 s), downloads the arm64 Python and the aarch64
    TVM wheels (~150 MB, ~25 s on a fast link; 0.45 GB on disk) into a temporary sibling directory
    and renames it to ``root`` when it checks out, so an interrupted set-up never leaves a
    half-valid root. A root built for other
    TVM versions than the host's is rebuilt. Raises :class:`EmulationUnavailable` when set-up is
    impossible here (no root rights and tools missing, no network, no disk space, not Debian).
    """
    root = Path(root).expanduser().absolute() if root is not None else default_root()
    say: Progress = progress or log.info
    want = _want_stamp()
    if not _host_tools_missing() and _stamp_ok(root, want):
        return ArmRoot(root, root / "bin" / "python3")

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmulationUnavailable(f"cannot create {root.parent}: {exc}") from exc
    with _locked(root.parent / f".{root.name}.lock"):
        _ensure_host_tools(say)
        if _stamp_ok(root, want):  # built by another process while we waited
            return ArmRoot(root, root / "bin" / "python3")
        free = shutil.disk_usage(root.parent).free
        if free < DISK_NEEDED:
            raise EmulationUnavailable(f"{free / 1e9:.1f} GB free in {root.parent}; the arm64 root "
                                       f"needs {DISK_NEEDED / 1e9:.1f} GB")
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by an interrupted set-up
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            t0 = time.monotonic()
            qemu = shutil.which(QEMU)
            assert qemu is not None  # _ensure_host_tools checked
            _fetch_python_debs(tmp, say)
            _pip_install_tvm(tmp, want, say)
            launcher = _write_launcher(tmp, qemu)
            info = _verify(launcher, want, say)
            stamp = {**want, "qemu": qemu, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "seconds": round(time.monotonic() - t0, 1), "verified": info}
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
            old = None
            if root.exists() or root.is_symlink():
                old = root.with_name(f".{root.name}.tmp-old-{os.getpid()}")
                root.rename(old)
            tmp.rename(root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            say(f"arm64: root ready at {root} ({stamp['seconds']} s)")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ArmRoot(root, root / "bin" / "python3")


# --------------------------------------------------------------------------------------------
# compiling and running


def cross_compiler() -> Callable[..., Any]:
    """The ``fcompile`` for ``export_library`` of modules built for :data:`ARM_TARGET`."""
    from tvm.support import cc

    return cc.cross_compiler(CROSS_CC)


def arm_target(**extra: Any) -> tvm.target.Target:
    """:data:`ARM_TARGET` (plus ``extra`` keys, e.g. ``**{"num-cores": 2}``) as a ``Target``.

    TVM 0.27's ``tvm.compile`` of a *Relax* module needs this: given the plain dict it fails
    with ``TypeError: argument of type 'builtin_function_or_method' is not iterable``
    (``relax/vm_build.py`` reads ``target.keys``). TE/TIR modules accept either.
    """
    import tvm

    return tvm.target.Target({**ARM_TARGET, **extra})


def load_on_remote(remote: Any, module: Any, name: str = "kernel.so") -> tvm.runtime.Module:
    """Export ``module`` (a ``tvm.compile`` result for :data:`ARM_TARGET`: a TE/TIR library or a
    Relax ``VMExecutable``) with the cross compiler, upload it to ``remote`` and load it there.

    For a Relax executable wrap the result: ``relax.VirtualMachine(mod, remote.cpu())``.
    """
    with tempfile.TemporaryDirectory(prefix="dcgraph-arm-") as tmp:
        path = Path(tmp) / name
        module.export_library(str(path), fcompile=cross_compiler())
        remote.upload(str(path))
    return remote.load_module(name)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        s.bind((host, port))


def _parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"tracker address must be 'host:port', got {addr!r}")
    return host, int(port)


class ArmRpcServer:
    """TVM's stock RPC server running under the emulated aarch64 Python (a context manager).

    ``with ArmRpcServer() as server: remote = server.connect()``. Without ``tracker`` the server
    listens on ``host:port`` (127.0.0.1 and a free port by default). With ``tracker="host:port"``
    and ``key`` it also registers with that RPC tracker, and :meth:`connect` goes through it. The
    server and all its workers form one process group, killed on exit.
    """

    def __init__(self, root: ArmRoot | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 tracker: str | None = None, key: str | None = None, timeout: float = 60.0,
                 custom_addr: str | None = None) -> None:
        if tracker is not None:
            self.tracker: tuple[str, int] | None = _parse_addr(tracker)
            if not key:
                raise ValueError("a key is needed to register with a tracker (key='arm64', say)")
        else:
            self.tracker = None
        self.arm_root = root
        self.host = host
        self.port = port
        self.key = key or ""
        self.timeout = timeout
        self.custom_addr = custom_addr
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self._logdir: Path | None = None

    # -- life cycle

    def __enter__(self) -> ArmRpcServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log_path(self) -> Path | None:
        """The server's combined stdout/stderr while it runs."""
        return self._logdir / "rpc_server.log" if self._logdir else None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server printed."""
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines) if self.log_path else ""
        except OSError:
            return ""

    def start(self) -> None:
        """Start the server and wait (up to ``timeout`` s) until it accepts connections."""
        if self.proc is not None:
            return
        if self.tracker is not None:
            self._check_tracker()
        if self.arm_root is None:
            self.arm_root = ensure_arm_root()
        auto_port = self.port is None
        if not auto_port:
            try:
                _check_port_free(self.host, self.port)
            except OSError as exc:
                raise ArmRpcError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        for attempt in range(3):
            if auto_port:
                self.port = _free_port(self.host)
            try:
                self._launch()
                break
            except ArmRpcError as exc:  # another process took the free port first: try another
                if not (auto_port and attempt < 2 and "cannot bind to any port" in str(exc)):
                    raise
                log.warning("port %d was taken before the ARM RPC server bound it; retrying", self.port)
        log.info("ARM RPC server on %s:%d after %.1f s", self.host, self.port, self.start_seconds)

    def _launch(self) -> None:
        assert self.arm_root is not None and self.port is not None
        cmd = [str(self.arm_root.python), "-m", "tvm.exec.rpc_server", "--host", self.host,
               "--port", str(self.port), "--port-end", str(self.port + 1)]
        if self.tracker is not None:
            cmd += ["--tracker", f"{self.tracker[0]}:{self.tracker[1]}", "--key", self.key]
            if self.custom_addr:
                cmd += ["--custom-addr", self.custom_addr]
        self._logdir = Path(tempfile.mkdtemp(prefix="dcgraph-arm-rpc-"))
        t0 = time.monotonic()
        with open(self._logdir / "rpc_server.log", "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         cwd=self._logdir, start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Kill the server's whole process group (idempotent)."""
        proc, self.proc = self.proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            # start_new_session made the server the leader of its own group: this reaches its
            # PopenWorker and the forked session processes, and nothing else.
            stop_process_group(proc)
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None

    # -- sessions

    def connect(self, session_timeout: float = 0) -> Any:
        """A ``tvm.rpc`` session on the emulated CPU (through the tracker when there is one)."""
        from tvm import rpc

        if self.proc is None:
            raise ArmRpcError("the ARM RPC server is not running (use it as a context manager)")
        if self.tracker is not None:
            return rpc.connect_tracker(*self.tracker).request(self.key, session_timeout=session_timeout)
        return rpc.connect(self._probe_host, self.port, key=self.key, session_timeout=session_timeout)

    @property
    def address(self) -> str:
        """``host:port`` of the server itself."""
        return f"{self.host}:{self.port}"

    # -- internals

    @property
    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def _tracker_summary(self) -> dict[str, Any]:
        """The tracker's summary, over a socket with a timeout (tvm's client has none)."""
        from tvm.rpc import base

        assert self.tracker is not None
        with socket.create_connection(self.tracker, timeout=3) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise ArmRpcError(f"{self.tracker[0]}:{self.tracker[1]} answers, but is not a TVM RPC "
                                  f"tracker")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            code, summary = base.recvjson(sock)
            if code != base.TrackerCode.SUCCESS:
                raise ArmRpcError(f"tracker {self.tracker[0]}:{self.tracker[1]} refused a summary ({code})")
            return summary

    def _check_tracker(self) -> None:
        assert self.tracker is not None
        try:
            self._tracker_summary()
        except OSError as exc:
            raise ArmRpcError(
                f"RPC tracker {self.tracker[0]}:{self.tracker[1]} is not reachable ({exc}); start one "
                f"(python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {self.tracker[1]}) or fix the "
                f"address") from exc

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

    def _registered(self) -> bool:
        """Whether the tracker lists this server (its key and port)."""
        try:
            summary = self._tracker_summary()
        except (OSError, ValueError):
            return False
        return any(str(info.get("key", "")).startswith(f"server:{self.key}")
                   and int((info.get("addr") or [None, 0])[1] or 0) == self.port
                   for info in summary.get("server_info", []))

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None and self.port is not None
        deadline = t0 + self.timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ArmRpcError(f"ARM RPC server exited with code {rc} during start-up; "
                                  f"its output:\n{self.log_tail()}")
            text = self.log_tail(60)
            if "Cannot connect to tracker" in text or "is not RPC Tracker" in text:
                raise ArmRpcError(f"ARM RPC server cannot register with tracker "
                                  f"{self.tracker[0]}:{self.tracker[1]}:\n{self.log_tail()}")
            if "Traceback" in text:
                raise ArmRpcError(f"ARM RPC server failed during start-up:\n{self.log_tail()}")
            if self._registered() if self.tracker is not None else self._answers():
                return
            if time.monotonic() > deadline:
                raise ArmRpcError(f"ARM RPC server not ready after {self.timeout:.0f} s; its output:\n"
                                  f"{self.log_tail() or '(none)'}")
            time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# command line


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
    """``python -m dcgraph.backends.tvm.emulation``: build (or check) the arm64 root."""
    parser = argparse.ArgumentParser(
        prog="python -m dcgraph.backends.tvm.emulation",
        description="Set up emulated aarch64 execution for TVM kernels: qemu-user, the aarch64 cross "
                    "gcc, an arm64 Python 3.11 with TVM. Idempotent; the first run downloads ~250 MB.")
    parser.add_argument("--root", type=Path, default=None,
                        help="where to build it (default: $DCGRAPH_ARM_ROOT or ~/.cache/dcgraph/arm64)")
    parser.add_argument("--smoke", action="store_true",
                        help="then start an RPC server and run a vector add on the emulated CPU")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
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
    if args.smoke:
        _smoke(arm_root, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
