"""The ``dcgraph`` command: --help, --version, the demo job, bad arguments."""

import subprocess
import sys

import dcgraph
from dcgraph import cli


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcgraph.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_help_and_version(capsys):
    assert cli.main([]) == 0
    assert "Deep Control" in capsys.readouterr().out
    res = _run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"dcgraph {dcgraph.__version__}"
    res = _run("demo", "--help")
    assert res.returncode == 0 and "--batch" in res.stdout


def test_demo_runs_and_reports():
    res = _run("demo", "--batch", "2", "--size", "16", "--repeats", "2", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "outputs and all gradients agree" in res.stdout
    for label in ("fused op", "plain ops", "BatchNorm"):
        assert label in res.stdout


def test_bad_argument_is_a_usage_error_not_a_traceback():
    res = _run("demo", "--batch", "0")
    assert res.returncode == 2
    assert "positive integer" in res.stderr and "Traceback" not in res.stderr
