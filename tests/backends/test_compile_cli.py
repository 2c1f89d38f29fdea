"""``dcgraph compile``: the whole pipeline from the command line, its library, its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dcgraph import zoo
from dcgraph.backends import tvm as dtvm
from dcgraph.cli import main as cli_main
from dcgraph.testing import relative_error


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcgraph.cli", "compile", *args], capture_output=True,
                          text=True, timeout=600, check=False)


def test_help_explains_targets(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["compile", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("x86", "arm", "cuda", "UNTUNED", ".onnx"):
        assert word in out


def test_compile_x86_verifies_times_and_writes_a_loadable_library(tmp_path):
    out = tmp_path / "r.so"
    res = _run("resnet18", "--input-shape", "2,3,32,32", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "verified here" in res.stdout and "latency:" in res.stdout
    assert "UNTUNED" in res.stdout  # no database: it says so
    meta = json.loads((tmp_path / "r.so.json").read_text())
    assert meta["inputs"][0]["shape"] == [2, 3, 32, 32]
    compiled = dtvm.load(out)  # the CLI verified its numbers; here: it loads and runs
    y = compiled(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all())
    assert not list(tmp_path.glob(".dcgraph-*"))  # no temporary left behind


def test_export_load_round_trip_matches_torch(tmp_path):
    model = zoo.randomize_norm_stats(zoo.resnet18_like(width=8)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    compiled = dtvm.compile(model, "x86", x)
    path = compiled.export(tmp_path / "m.so")
    loaded = dtvm.load(path)
    assert loaded.inputs == compiled.inputs and loaded.kernels == compiled.kernels
    for m in (compiled, loaded):
        assert relative_error(m(x), want) < 1e-4
    with pytest.raises(dtvm.CompileError, match="compiled for"):
        loaded(torch.randn(1, 3, 32, 32))


def test_compile_onnx_file(tmp_path, capsys):
    from dcgraph.onnx_export import export_onnx
    from dcgraph.onnx_tools import save_atomic

    model = zoo.randomize_norm_stats(zoo.resnet18_like(width=8)).eval()
    path = tmp_path / "r.onnx"
    save_atomic(export_onnx(model, torch.randn(1, 3, 32, 32)), str(path))
    assert cli_main(["compile", str(path), "--input-shape", "1,3,32,32"]) == 0
    assert "verified here" in capsys.readouterr().out


def test_compile_cuda_here_writes_a_library(tmp_path, capsys):
    """No GPU here: the CUDA library is generated and written, not run (in-process; the x86
    command above runs as a user runs it)."""
    out = tmp_path / "r_cuda.so"
    args = ["compile", "resnet18", "--target", "cuda", "--input-shape", "1,3,32,32", "-o", str(out)]
    assert cli_main(args) == 0
    assert "cuda sm_90" in capsys.readouterr().out and out.is_file()


@pytest.mark.parametrize(("args", "message"), [
    (("resnet18", "--target", "foo"), "unknown target"),
    (("resnet18", "-o", "out.txt"), "must end in .so"),
    (("missing.onnx",), "no such file"),
    (("resnet18", "--input-shape", "1,3"), "bad input shape"),
])
def test_bad_input_is_one_line_not_a_traceback(args, message, capsys, tmp_path, monkeypatch):
    """In-process (the real command runs in a subprocess above): exit 1 (2 for what argparse's
    types refuse), one line, no file. Every option's wrong value: tests/test_cli_errors.py."""
    monkeypatch.chdir(tmp_path)
    try:
        code = cli_main(["compile", *args])
    except SystemExit as e:
        code = e.code
    assert code in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("dcgraph compile: error:"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # its own emulated server start + a whole compile: ~80 s (the ARM route is
# also checked in-process by test_whole_models.py and test_tvm_arm.py)
def test_compile_arm_verifies_on_the_emulated_board(arm_remote, tmp_path):
    """--verify runs the cross-compiled model on the emulated ARM server (its own server)."""
    out = tmp_path / "r_arm.so"
    res = _run("resnet18", "--target", "arm", "--input-shape", "1,3,32,32", "--verify", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "verified on emulated ARM" in res.stdout
    assert out.read_bytes()[:4] == b"\x7fELF"
