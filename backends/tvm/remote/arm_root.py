"""The emulated arm64 root: a private directory in which an aarch64 Python 3.11 with TVM runs
under qemu-user, so that ARM kernels run here with no board, chroot or binfmt_misc.

:func:`ensure_arm_root` builds it once (then cached, ``~/.cache/dcgraph/arm64``): the host tools
(``qemu-user-static``, the aarch64 cross gcc) with apt if missing, Debian's arm64 ``python3.11``
and its library closure (``apt-get download`` into a private apt state, ``dpkg-deb -x``), PyPI's
``manylinux_2_28_aarch64`` wheels of TVM (installed by the host's pip with ``--target``), and
a launcher script that runs that Python under ``qemu-aarch64-static``. A root is built in a
temporary sibling and renamed into place once it checks out, so an interrupted set-up never
leaves a half-valid one. :class:`.arm_server.ArmRpcServer` runs TVM's RPC server with it.

``python -m dcgraph.backends.tvm.remote`` (``make arm-setup``) builds it ahead of time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import EmulationUnavailable
from .rpc import tail as _tail

__all__ = ["CROSS_CC", "QEMU_CPU", "ArmRoot", "EmulationUnavailable", "default_root", "ensure_arm_root"]

log = logging.getLogger(__name__)

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


def apt_install(packages: Sequence[str], progress: Progress) -> None:
    """``apt-get install`` host packages (root only; one ``apt-get update`` and a retry if the
    first try fails). Raises :class:`EmulationUnavailable` with the reason."""
    hint = "install " + " ".join(packages)
    if shutil.which("apt-get") is None:
        raise EmulationUnavailable(f"apt-get is not available: {hint}")
    if os.geteuid() != 0:
        raise EmulationUnavailable(f"not root (apt-get needs root): sudo apt-get {hint}")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    progress(f"host: apt-get install {' '.join(packages)}")
    res = _run(install, env=env)
    if res.returncode != 0:
        progress("host: install failed, running apt-get update and retrying")
        upd = _run(["apt-get", "update"], env=env)
        res = _run(install, env=env)
        if res.returncode != 0:
            reason = _oneline(res.stderr or res.stdout) or _oneline(upd.stderr)
            raise EmulationUnavailable(f"apt-get install {' '.join(packages)} failed "
                                       f"(network or apt sources?): {reason}")


def _ensure_host_tools(progress: Progress) -> None:
    """qemu-user-static and the aarch64 cross gcc on the host, installed with apt if missing."""
    missing = _host_tools_missing()
    if not missing:
        return
    try:
        apt_install(HOST_PACKAGES, progress)
    except EmulationUnavailable as exc:
        raise EmulationUnavailable(f"{', '.join(missing)} missing and {exc}") from None
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
# aarch64 Python {py} under qemu-user, written by dcgraph.backends.tvm.remote.arm_root.
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
"""Written by dcgraph.backends.tvm.remote.arm_root: child Pythons (TVM's PopenWorker, multiprocessing
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
