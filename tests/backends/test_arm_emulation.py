"""TVM kernels on an emulated aarch64 CPU (qemu-user + the stock TVM RPC server): TE kernels and a
Relax VM match numpy; tracker registration; clear errors for a bad tracker.

The first run builds the arm64 root (~30 s plus apt, see ``make arm-setup``); after that the
module takes ~30 s, most of it the emulated Python importing TVM at server start.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, te  # noqa: E402

import dcgraph.backends.tvm.remote.arm_root as em  # noqa: E402
from dcgraph.backends.tvm.remote import (  # noqa: E402
    ARM_TARGET,
    ArmRoot,
    ArmRpcError,
    ArmRpcServer,
    EmulationUnavailable,
    arm_target,
    cross_compiler,
    ensure_arm_root,
    load_on_remote,
)

RNG = np.random.default_rng(0)
EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def arm_root() -> ArmRoot:
    try:
        return ensure_arm_root()
    except EmulationUnavailable as exc:
        pytest.skip(f"ARM emulation unavailable: {exc}")


@pytest.fixture(scope="module")
def server(arm_root: ArmRoot):
    with ArmRpcServer(arm_root) as srv:
        pgid = srv.proc.pid
        yield srv
    assert _live_members(pgid) == [], "the server's process group outlived it"


@pytest.fixture(scope="module")
def remote(server: ArmRpcServer):
    return server.connect()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are still running (zombies wait for init to reap them)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _vector_add(n: int):
    a, b = te.placeholder((n,), name="A"), te.placeholder((n,), name="B")
    c = te.compute((n,), lambda i: a[i] + b[i], name="C")
    return tvm.compile(te.create_prim_func([a, b, c]), target=ARM_TARGET)


def test_vector_add_spelled_out(remote, tmp_path: Path):
    """Every call of the path written out, as the module docstring documents it."""
    n = 1000
    lib = _vector_add(n)
    path = tmp_path / "vadd.so"
    lib.export_library(str(path), fcompile=cross_compiler())
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and struct.unpack_from("<H", header, 18)[0] == EM_AARCH64
    remote.upload(str(path))
    f = remote.load_module("vadd.so")
    dev = remote.cpu()
    a, b = RNG.random(n, dtype=np.float32), RNG.random(n, dtype=np.float32)
    c = tvm.runtime.empty((n,), "float32", dev)
    f["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev), c)
    np.testing.assert_allclose(c.numpy(), a + b, rtol=1e-6)


def _conv2d_nchw(n: int, ci: int, h: int, w: int, co: int, k: int, pad: int):
    """A plain TE conv2d (stride 1) with bias and ReLU, unscheduled."""
    x = te.placeholder((n, ci, h, w), name="x")
    wt = te.placeholder((co, ci, k, k), name="w")
    bias = te.placeholder((co,), name="bias")
    hp, wp = h + 2 * pad, w + 2 * pad
    xp = te.compute(
        (n, ci, hp, wp),
        lambda b, c, i, j: tvm.tirx.if_then_else(
            tvm.tirx.all(i >= pad, i < h + pad, j >= pad, j < w + pad),
            x[b, c, i - pad, j - pad], tvm.tirx.const(0.0, "float32")),
        name="xp")
    rc, ry, rx = te.reduce_axis((0, ci), "rc"), te.reduce_axis((0, k), "ry"), te.reduce_axis((0, k), "rx")
    ho, wo = hp - k + 1, wp - k + 1
    conv = te.compute((n, co, ho, wo), lambda b, o, i, j: te.sum(
        xp[b, rc, i + ry, j + rx] * wt[o, rc, ry, rx], axis=[rc, ry, rx]), name="conv")
    out = te.compute((n, co, ho, wo), lambda b, o, i, j: te.max(conv[b, o, i, j] + bias[o], 0.0), name="out")
    return te.create_prim_func([x, wt, bias, out]), (n, co, ho, wo)


def _conv2d_numpy(x: np.ndarray, w: np.ndarray, bias: np.ndarray, pad: int) -> np.ndarray:
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))  # n ci ho wo k k
    return np.maximum(np.einsum("nchwij,ocij->nohw", win, w) + bias[None, :, None, None], 0.0)


def test_te_conv2d(remote):
    func, out_shape = _conv2d_nchw(1, 4, 10, 10, 8, 3, pad=1)
    f = load_on_remote(remote, tvm.compile(func, target=ARM_TARGET), "conv.so")
    dev = remote.cpu()
    x = RNG.standard_normal((1, 4, 10, 10), dtype=np.float32)
    w = RNG.standard_normal((8, 4, 3, 3), dtype=np.float32)
    bias = RNG.standard_normal(8, dtype=np.float32)
    out = tvm.runtime.empty(out_shape, "float32", dev)
    f["main"](*(tvm.runtime.tensor(v, dev) for v in (x, w, bias)), out)
    np.testing.assert_allclose(out.numpy(), _conv2d_numpy(x, w, bias, 1), rtol=1e-4, atol=1e-5)


def _relax_matmul_relu(m: int, k: int, n: int) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            def matmul(a: te.Tensor, b: te.Tensor) -> te.Tensor:
                r = te.reduce_axis((0, k), "r")
                return te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="mm")

            mm = bb.emit_te(matmul, x, w)
            out = bb.emit_output(relax.op.nn.relu(mm))
        bb.emit_func_output(out)
    return bb.get()


def test_relax_vm_over_rpc(remote, tmp_path: Path):
    """The way whole models go: a Relax executable, exported, uploaded, run by the remote VM."""
    ex = tvm.compile(_relax_matmul_relu(4, 16, 8), target=arm_target())
    path = tmp_path / "mm_relu.so"
    ex.export_library(str(path), fcompile=cross_compiler())
    remote.upload(str(path))
    dev = remote.cpu()
    vm = relax.VirtualMachine(remote.load_module("mm_relu.so"), dev)
    x = RNG.standard_normal((4, 16), dtype=np.float32)
    w = RNG.standard_normal((16, 8), dtype=np.float32)
    out = vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev))
    np.testing.assert_allclose(out.numpy(), np.maximum(x @ w, 0.0), rtol=1e-5, atol=1e-5)


def _answer_nonsense(sock: socket.socket) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.recv(4)
        conn.sendall(b"HTTP")


def test_bad_tracker_address():
    """Refused before any emulation starts: nothing listening, not a tracker, malformed, no key."""
    with pytest.raises(ArmRpcError, match=r"tracker 127\.0\.0\.1:\d+ is not reachable"):
        ArmRpcServer(tracker=f"127.0.0.1:{_free_port()}", key="arm64").start()
    with socket.socket() as other:  # something else listens there and answers nonsense
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        thread = threading.Thread(target=_answer_nonsense, args=(other,), daemon=True)
        thread.start()
        with pytest.raises(ArmRpcError, match="not a TVM RPC tracker"):
            ArmRpcServer(tracker=f"127.0.0.1:{other.getsockname()[1]}", key="arm64").start()
        thread.join(5)
    with pytest.raises(ValueError, match="host:port"):
        ArmRpcServer(tracker="localhost", key="arm64")
    with pytest.raises(ValueError, match="key"):
        ArmRpcServer(tracker="127.0.0.1:9190")


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """What makes set-up impossible is an EmulationUnavailable with the reason in one line."""
    monkeypatch.setattr(em, "_host_tools_missing", lambda: ["qemu-aarch64-static"])
    monkeypatch.setattr(em.os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationUnavailable, match=r"not root.*qemu-user-static gcc-aarch64-linux-gnu"):
        ensure_arm_root(tmp_path / "r")
    monkeypatch.setattr(em, "_host_tools_missing", lambda: [])
    monkeypatch.setattr(em, "DISK_NEEDED", 1 << 60)
    with pytest.raises(EmulationUnavailable, match="GB free"):
        ensure_arm_root(tmp_path / "r")


def test_interrupted_setup_leaves_no_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def interrupted(tmp: Path, progress) -> None:
        (tmp / "usr").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(em, "_host_tools_missing", lambda: [])
    monkeypatch.setattr(em, "_fetch_python_debs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_arm_root(tmp_path / "r")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.lock"]


def test_a_warm_root_is_reused_not_rebuilt(arm_root: ArmRoot, monkeypatch: pytest.MonkeyPatch):
    """A second ensure_arm_root finds the stamp and returns: no apt, no pip, no new stamp."""
    def never(*args, **kwargs):
        raise AssertionError("a warm root must not be rebuilt")

    for step in ("_ensure_host_tools", "_fetch_python_debs", "_pip_install_tvm", "_write_launcher"):
        monkeypatch.setattr(em, step, never)
    stamp = arm_root.root / em.STAMP
    before = stamp.stat().st_mtime_ns, stamp.read_text()
    again = ensure_arm_root(arm_root.root)
    assert again == arm_root and again.python.is_file()
    assert (stamp.stat().st_mtime_ns, stamp.read_text()) == before
    assert again.env()["QEMU_LD_PREFIX"] == str(arm_root.root)


@pytest.mark.slow  # a second emulated server start: 10-25 s
def test_tracker_registration_and_cleanup(arm_root: ArmRoot):
    """Registers with a host tracker, runs through it, and leaves no process behind."""
    pytest.importorskip("tornado")
    from tvm.rpc.tracker import Tracker

    port = _free_port()
    tracker = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    try:
        with ArmRpcServer(arm_root, tracker=f"127.0.0.1:{tracker.port}", key="arm64-test") as srv:
            pgid = srv.proc.pid
            remote = srv.connect()
            dev = remote.cpu()
            f = load_on_remote(remote, _vector_add(64), "vadd_tracker.so")
            a = RNG.random(64, dtype=np.float32)
            c = tvm.runtime.empty((64,), "float32", dev)
            f["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(a, dev), c)
            np.testing.assert_allclose(c.numpy(), 2 * a, rtol=1e-6)
        assert _live_members(pgid) == []
    finally:
        tracker.terminate()
