"""The ``dcgraph`` command: --help, --version, the demo job, bad arguments."""

import re
import subprocess
import sys

import numpy as np
import pytest

import dcgraph
from dcgraph import cli


def _exit_code(argv: list[str]) -> int:
    """``cli.main``'s exit code: 1 for an error found while running, 2 for one argparse finds."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcgraph.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_help_and_version(capsys):
    assert cli.main([]) == 0
    assert "Deep Control" in capsys.readouterr().out
    res = _run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"dcgraph {dcgraph.__version__}"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--help"])
    assert exit_.value.code == 0 and "--batch" in capsys.readouterr().out


def test_demo_runs_and_reports():
    res = _run("demo", "--batch", "2", "--size", "16", "--repeats", "2", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "outputs and all gradients agree" in res.stdout
    found = re.search(r"verified TVM against the original PyTorch model: relative error (\S+) ", res.stdout)
    assert found and float(found.group(1)) <= 1e-4, res.stdout  # the number, not just the label
    for label in ("fused op", "plain ops", "BatchNorm"):
        assert label in res.stdout


def test_bad_argument_is_a_usage_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--batch", "0"])
    assert exit_.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_convert_writes_a_loadable_archive(tmp_path):
    import torch

    out = tmp_path / "mnv2.pt2"
    report = tmp_path / "report.json"
    res = _run("convert", "mobilenet_v2", "-o", str(out), "--json", str(report))
    assert res.returncode == 0, res.stderr
    assert "16 x conv+batchnorm->deep_control" in res.stdout
    assert "verified: rewritten vs original" in res.stdout
    program = torch.export.load(out)
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.dcgraph.conv_deep_control.default) == 16
    assert program.module()(torch.randn(3, 3, 64, 64)).shape == (3, 10)  # dynamic batch
    import json

    assert json.loads(report.read_text())["counts"]["conv+deep_control->fused"] == 16
    assert not list(tmp_path.glob(".dcgraph-*"))  # no temporary left behind


def test_convert_reports_skips_and_approximations():
    res = _run("convert", "two_users")
    assert res.returncode == 0, res.stderr
    assert "2 users" in res.stdout and "does not follow a convolution" in res.stdout
    res = _run("convert", "vgg", "--init", "fresh", "--no-fuse")
    assert res.returncode == 0, res.stderr
    assert "APPROXIMATE" in res.stdout and "fused" not in res.stdout.split("matches:")[0]


def test_convert_external_factory_and_errors(tmp_path, capsys):
    assert cli.main(["convert", "dcgraph.zoo:vgg_like", "--input-shape", "1,3,32,32",
                     "--static-batch"]) == 0
    assert "6 x conv+batchnorm->deep_control" in capsys.readouterr().out
    for args, message in [
        (["nope"], "unknown model"),
        (["os:getcwd"], "not a torch.nn.Module"),
        (["no_such_pkg:f"], "cannot import"),
        (["resnet18", "--input-shape", "1,3"], "bad input shape"),
        (["resnet18", "-o", str(tmp_path / "x.onnx")], "end in .pt2"),
    ]:
        assert _exit_code(["convert", *args]) in (1, 2), args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_export_and_convert_with_external_data(tmp_path, capsys):
    import hashlib

    import onnx

    from dcgraph import onnx_tools

    src = tmp_path / "mnv2.onnx"
    assert cli.main(["onnx", "export", "mobilenet_v2", "-o", str(src)]) == 0
    ext = tmp_path / "ext.onnx"  # the same model with its weights in a side file
    onnx_tools.save_atomic(onnx.load(str(src)), ext, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists() and onnx_tools.uses_external_data(ext)
    digest = hashlib.sha256(ext.read_bytes() + (tmp_path / "ext.onnx.data").read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    assert cli.main(["onnx", "convert", str(ext), "-o", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "16 x conv+batchnorm->deep_control" in text and "verified in onnxruntime" in text
    assert (tmp_path / "out.onnx.data").exists()  # external in, external out
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DeepControlConv") + ops.count("DeepControlConvAdd") == 16  # with residual tails
    after = hashlib.sha256(ext.read_bytes() + (tmp_path / "ext.onnx.data").read_bytes()).hexdigest()
    assert after == digest  # the input is untouched
    assert not list(tmp_path.glob(".dcgraph-*"))


def test_onnx_convert_errors(tmp_path, capsys):
    import onnx
    from onnx import helper as h

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    good = tmp_path / "good.onnx"
    assert cli.main(["onnx", "export", "vgg", "-o", str(good)]) == 0
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    noconv = tmp_path / "noconv.onnx"
    onnx.save(h.make_model(h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [x],
                                        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])),
              str(noconv))
    invalid = tmp_path / "invalid.onnx"  # a node reading a value nothing produces
    onnx.save(h.make_model(h.make_graph([h.make_node("Relu", ["nowhere"], ["y"])], "g", [x],
                                        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])),
              str(invalid))
    capsys.readouterr()
    for args, message in [
        ([str(truncated), "-o", str(tmp_path / "o.onnx")], "not a readable ONNX model"),
        ([str(noconv), "-o", str(tmp_path / "o.onnx")], "no Conv node"),
        ([str(invalid), "-o", str(tmp_path / "o.onnx")], "checker rejects"),
        ([str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")], "no such file"),
        ([str(bad), "-o", str(tmp_path / "o.onnx")], "not a readable ONNX model"),
        ([str(bad), "-o", str(bad)], "must differ"),
        ([str(bad), "-o", str(tmp_path / "nodir" / "o.onnx")], "no such directory"),
    ]:
        assert _exit_code(["onnx", "convert", *args]) in (1, 2), args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_onnx_convert_verify_rejects_a_nan_output(tmp_path, capsys):
    """A model whose output is NaN (a negative running variance) cannot be "verified"."""
    import onnx
    import torch
    from onnx import numpy_helper as nh
    from torch import nn

    from dcgraph.onnx_export import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    proto = export_onnx(model, torch.randn(1, 3, 8, 8))
    (var,) = [t for t in proto.graph.initializer if "running_var" in t.name]
    var.CopyFrom(nh.from_array(-np.ones(4, np.float32), var.name))
    src, out = tmp_path / "nan.onnx", tmp_path / "out.onnx"
    onnx.save(proto, str(src))
    capsys.readouterr()
    assert cli.main(["onnx", "convert", str(src), "-o", str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "relative difference inf" in err and "Traceback" not in err
    assert not out.exists()  # nothing written when the verification fails


def test_demo_exits_non_zero_when_tvm_disagrees(monkeypatch, capsys):
    """The demo's TVM check has a threshold: a NaN (or any error above 1e-4) fails the command."""
    pytest.importorskip("tvm")
    from dcgraph import demo
    from dcgraph.passes.verify import VerificationError

    monkeypatch.setattr(demo, "relative_error", lambda got, want: float("nan"))
    with pytest.raises(VerificationError, match="differs from the original"):
        demo.rewrite_section(batch=1, repeats=1, width=4, size=32)

    def broken(*args, **kwargs):
        raise VerificationError("the TVM-compiled model differs from the original: relative error inf")

    monkeypatch.setattr(demo, "rewrite_section", broken)
    assert cli.main(["demo", "--batch", "1", "--repeats", "1", "--no-progress"]) == 1
    assert "dcgraph demo: error: the TVM-compiled model differs" in capsys.readouterr().err
