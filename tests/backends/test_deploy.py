"""Deploying a compiled model: batch buckets (any batch size from one library), the runtime-only
runner (``runner.py`` / ``dcgraph run``) here and on the emulated ARM board, the C++ example.

References: the model in eager PyTorch (whole models), and what ``compile()``'s own model returns
for the runner and the C++ example (they must run the same library to the same numbers).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dcgraph import zoo
from dcgraph.backends import tvm as dtvm
from dcgraph.backends.tvm.buckets import bucket_sizes
from dcgraph.backends.tvm.errors import CompileError
from dcgraph.backends.tvm.runner import RunnerError, plan_batches
from dcgraph.cli.run import runner_path
from dcgraph.compare import relative_error

RTOL = 1e-4
SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A small ResNet-18-like BatchNorm model (converted to Deep Control by compile), BN non-trivial."""
    torch.manual_seed(0)
    return zoo.randomize_norm_stats(zoo.resnet18_like(width=8)).eval()


@pytest.fixture(scope="module")
def bucketed(model):
    """The model compiled with batch buckets 2 and 4 (the example's batch is 2): odd batches pad."""
    return dtvm.compile(model, "x86", torch.randn(2, *SHAPE), buckets=[4])


def _eager(model, x):
    with torch.no_grad():
        return model(x)


# -- the plan -------------------------------------------------------------------------------------


@given(n=st.integers(1, 40), buckets=st.sets(st.integers(1, 12), min_size=1, max_size=4))
def test_plan_covers_the_batch_with_the_least_padding(n, buckets):
    plan = plan_batches(n, buckets)
    assert sum(take for _, take in plan) == n
    assert all(b in buckets and 1 <= take <= b for b, take in plan)
    padded = sum(b - take for b, take in plan)
    # brute force: the fewest padded samples any multiset of at most len(plan) + 2 calls reaches
    best = min(sum(c) - n for k in range(1, len(plan) + 3)
               for c in itertools.combinations_with_replacement(sorted(buckets), k) if sum(c) >= n
               and sum(c) - max(c) < n)
    assert padded == best


def test_plan_prefers_exact_buckets_then_fewer_calls():
    assert sorted(plan_batches(7, [1, 2, 4, 8])) == [(1, 1), (2, 2), (4, 4)]
    assert plan_batches(8, [1, 2, 4, 8]) == [(8, 8)]
    assert plan_batches(3, [4, 8]) == [(4, 3)]
    assert sorted(plan_batches(11, [1, 2, 4, 8])) == [(1, 1), (2, 2), (8, 8)]
    with pytest.raises(RunnerError):
        plan_batches(0, [1])


# -- buckets ----------------------------------------------------------------------------------------


def test_any_batch_size_gives_the_reference_without_recompiling(bucketed, model, monkeypatch):
    import tvm

    assert bucketed.entries == {2: "main", 4: "main_b4"}
    assert bucketed.inputs[0].shape == (-1, *SHAPE)
    assert "batch buckets 2, 4" in bucketed.summary()

    def no_build(*_a, **_k):
        raise AssertionError("compiled at call time")

    monkeypatch.setattr(tvm, "compile", no_build)
    for n in (1, 3, 8, 2, 5, 4, 7):
        x = torch.randn(n, *SHAPE)
        got = bucketed(x)
        assert got.shape[0] == n
        assert relative_error(got, _eager(model, x)) < RTOL, n
    x = np.random.default_rng(1).standard_normal((3, *SHAPE)).astype(np.float32)  # numpy in, numpy out
    got = bucketed(x)
    assert isinstance(got, np.ndarray)
    assert relative_error(got, _eager(model, torch.from_numpy(x)).numpy()) < RTOL


def test_a_wrong_sample_shape_is_refused(bucketed):
    with pytest.raises(CompileError, match="compiled for"):
        bucketed(torch.randn(3, 3, 16, 17))


class _MixesSamples(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y - y.mean(dim=0, keepdim=True)  # a statistic over the batch


def test_a_model_that_mixes_samples_is_refused():
    with pytest.raises(CompileError, match="mixes samples across the batch"):
        dtvm.compile(_MixesSamples().eval(), "x86", torch.randn(2, *SHAPE), max_batch=2)


def test_default_buckets_are_powers_of_two_up_to_the_maximum():
    assert bucket_sizes(2, max_batch=8) == (1, 2, 4, 8)
    assert bucket_sizes(3, max_batch=6) == (1, 2, 3, 4, 6)
    assert bucket_sizes(2, buckets=[8]) == (2, 8)
    assert bucket_sizes(2) == ()


def test_bucket_arguments_are_checked(model):
    with pytest.raises(CompileError, match="max_batch"):
        dtvm.compile(model, "x86", torch.randn(1, *SHAPE), max_batch=0)
    with pytest.raises(CompileError, match="above max_batch"):
        dtvm.compile(model, "x86", torch.randn(1, *SHAPE), max_batch=2, buckets=[1, 4])


# -- the runtime-only runner ------------------------------------------------------------------------

#: runs runner.py as a device would: torch and dcgraph cannot be imported, TVM's runtime library
#: only; after the run, the TVM libraries this process mapped are printed
_ISOLATED = """\
import runpy, sys
sys.modules["torch"] = None
sys.modules["dcgraph"] = None
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps") if "libtvm" in line})
print("LIBS", ",".join(libs))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def exported(bucketed, tmp_path_factory):
    lib = tmp_path_factory.mktemp("deploy") / "model.so"
    bucketed.export(lib)
    return lib


def test_runner_needs_only_the_runtime_and_matches_compile(bucketed, exported, tmp_path):
    x = np.random.default_rng(2).standard_normal((5, *SHAPE)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    argv = [str(runner_path()), str(exported), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
            "--time", "--repeat", "2"]
    res = subprocess.run([sys.executable, "-c", _ISOLATED, *argv], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    libs = res.stdout.split("LIBS ")[-1].split()[0].split(",")
    assert "libtvm_runtime.so" in libs and "libtvm_compiler.so" not in libs, libs
    assert "latency:" in res.stdout
    assert relative_error(np.load(tmp_path / "y.npy"), bucketed(x)) < 1e-6


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcgraph.cli", *args], capture_output=True, text=True,
                          timeout=900, check=False)


def test_dcgraph_run_errors_are_one_line_and_write_nothing(exported, tmp_path, capsys):
    from dcgraph import cli

    good = tmp_path / "x.npy"
    np.save(good, np.zeros((1, *SHAPE), np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(tmp_path / "f64.npy", np.zeros((1, *SHAPE)))
    out = tmp_path / "y.npy"
    cases = [
        ([str(exported), "-i", str(tmp_path / "missing.npy"), "-o", str(out)], "missing.npy"),
        ([str(exported), "-i", str(tmp_path / "wrong.npy"), "-o", str(out)], "has shape (1, 3, 8, 8)"),
        ([str(exported), "-i", str(tmp_path / "f64.npy"), "-o", str(out)], "is float64"),
        ([str(exported), "-i", str(good), "-i", str(good), "-o", str(out)], "takes 1 inputs, got 2"),
        ([str(exported), "-i", str(good), "-o", str(tmp_path / "y.txt")], "must end in .npy or .npz"),
        ([str(exported), "-i", str(good), "-o", str(tmp_path / "nodir" / "y.npy")], "no such directory"),
        ([str(tmp_path / "nothere.so"), "-i", str(good), "-o", str(out)], "must both exist"),
    ]
    for argv, message in cases:
        try:
            code = cli.main(["run", *argv])
        except SystemExit as e:  # what argparse's types refuse (the output path)
            code = e.code
        assert code in (1, 2), argv
        lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if "Scope Loaded" not in ln]
        assert len(lines) == 1 and lines[0].startswith("dcgraph run: error:") and message in lines[0], lines
        assert not out.exists() and not list(tmp_path.glob(".dcgraph-*"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", str(exported), "-i", str(good), "--repeat", "0"])
    assert exit_.value.code == 2 and "positive integer" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cpp_example_runs_the_library(bucketed, exported, tmp_path):
    import tvm
    import tvm_ffi

    tvm_dir, ffi_dir = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    source = runner_path().parent / "cpp" / "run_model.cc"
    exe = tmp_path / "run_model"
    build = subprocess.run(
        ["g++", "-std=c++17", "-O1", str(source), f"-I{tvm_dir / 'include'}", f"-I{ffi_dir / 'include'}",
         f"-I{ffi_dir / '3rdparty' / 'dlpack' / 'include'}", f"-L{tvm_dir / 'lib'}", f"-L{ffi_dir / 'lib'}",
         "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{tvm_dir / 'lib'}:{ffi_dir / 'lib'}", "-o", str(exe)],
        capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    x = np.random.default_rng(3).standard_normal((4, *SHAPE)).astype(np.float32)
    x.tofile(tmp_path / "x.f32")
    res = subprocess.run([str(exe), str(exported), str(tmp_path / "x.f32"), "4,3,16,16",
                          str(tmp_path / "y.f32"), "main_b4"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    want = bucketed(x)
    assert f"output shape {','.join(map(str, want.shape))}" in res.stdout
    got = np.fromfile(tmp_path / "y.f32", dtype=np.float32).reshape(want.shape)
    assert relative_error(got, want) < 1e-6


@pytest.mark.slow  # an emulated board start + an aarch64 build: ~60 s
def test_dcgraph_run_on_the_emulated_arm_board(model, tmp_path, arm_remote):
    """An aarch64 library with buckets, run by `dcgraph run` under qemu with TVM's aarch64 runtime
    (no dcgraph or torch there), against eager PyTorch on this machine. ``arm_remote`` makes sure
    the emulated root exists (it skips where emulation cannot be set up)."""
    lib = tmp_path / "arm.so"
    dtvm.compile(model, "arm", torch.randn(1, *SHAPE), max_batch=2).export(lib)
    x = np.random.default_rng(4).standard_normal((3, *SHAPE)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = _cli("run", str(lib), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "emulated ARM board" in res.stderr
    assert relative_error(np.load(tmp_path / "y.npy"), _eager(model, torch.from_numpy(x)).numpy()) < RTOL
