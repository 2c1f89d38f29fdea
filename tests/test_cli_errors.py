"""Every command, a wrong value for each of its options, as a new user would type it: one clear
line on stderr (``dcgraph <command>: error: ...``, the last one; a command may have said what it
started before it), no traceback, a non-zero exit, and no file written.

Each case runs in an empty working directory with its outputs pointed into it; the directory must
still be empty afterwards (no output, no temporary file left behind).
"""

from __future__ import annotations

import pytest

from dcgraph import cli

#: (argv, a fragment the error line must contain); "OUT" is replaced by the case's empty directory
CASES = [
    # demo
    (["demo", "--batch", "0"], "positive integer"),
    (["demo", "--size", "x"], "positive integer"),
    (["demo", "--repeats", "-1"], "positive integer"),
    (["demo", "--threads", "0"], "positive integer"),
    (["demo", "--bogus"], "unrecognized arguments"),
    # convert
    (["convert", "nosuch", "-o", "OUT/m.pt2"], "unknown model 'nosuch'"),
    (["convert", "nosuch.module:make", "-o", "OUT/m.pt2"], "cannot import 'nosuch.module'"),
    (["convert", "dcnet", "-o", "OUT/m.onnx"], "must end in .pt2"),
    (["convert", "dcnet", "-o", "OUT/missing/m.pt2"], "no such directory"),
    (["convert", "dcnet", "--init", "random", "-o", "OUT/m.pt2"], "invalid choice: 'random'"),
    (["convert", "dcnet", "--input-shape", "1,5,64,64", "-o", "OUT/m.pt2"], "does not take an input"),
    (["convert", "dcnet", "--input-shape", "1,3,x", "-o", "OUT/m.pt2"], "bad input shape"),
    (["convert", "dcnet", "--input-shape", "0,3,8,8", "-o", "OUT/m.pt2"], "positive sizes"),
    (["convert", "dcnet", "--json", "OUT/missing/r.json", "-o", "OUT/m.pt2"], "no such directory"),
    (["convert", "dcnet", "--json", "OUT/r.txt"], "must end in .json"),
    # onnx
    (["onnx"], "required: COMMAND"),
    (["onnx", "convert", "OUT/none.onnx", "-o", "OUT/y.onnx"], "none.onnx"),
    (["onnx", "convert", "OUT/none.onnx", "-o", "OUT/y.pt2"], "must end in .onnx"),
    (["onnx", "convert", "OUT/none.onnx", "-o", "OUT/y.onnx", "--init", "x"], "invalid choice: 'x'"),
    (["onnx", "convert", "OUT/none.onnx", "-o", "OUT/y.onnx", "--input-shape", "1"], "bad input shape"),
    (["onnx", "convert", "OUT/none.onnx", "-o", "OUT/y.onnx", "--json", "OUT/no/r.json"], "no such dir"),
    (["onnx", "export", "nosuch", "-o", "OUT/y.onnx"], "unknown model 'nosuch'"),
    (["onnx", "export", "dcnet", "-o", "OUT/y.so"], "must end in .onnx"),
    (["onnx", "export", "dcnet", "-o", "OUT/y.onnx", "--input-shape", "1,5,64,64"], "does not take an input"),
    # compile
    (["compile", "nosuch", "-o", "OUT/m.so"], "unknown model 'nosuch'"),
    (["compile", "dcnet", "--target", "nosuch", "-o", "OUT/m.so"], "nosuch"),
    (["compile", "dcnet", "-o", "OUT/m.tar"], "must end in .so"),
    (["compile", "dcnet", "-o", "OUT/missing/m.so"], "no such directory"),
    (["compile", "dcnet", "--input-shape", "1,5,64,64", "-o", "OUT/m.so"], "does not take an input of shape"),
    (["compile", "dcnet", "--input-shape", "a,b", "-o", "OUT/m.so"], "bad input shape"),
    (["compile", "dcnet", "--plan", "fast", "-o", "OUT/m.so"], "invalid choice: 'fast'"),
    (["compile", "dcnet", "--layout", "nhwc", "-o", "OUT/m.so"], "invalid choice: 'nhwc'"),
    (["compile", "dcnet", "--max-batch", "0", "-o", "OUT/m.so"], "positive integer"),
    (["compile", "dcnet", "--db", "OUT/nodb", "-o", "OUT/m.so"], "nodb"),
    (["compile", "OUT/none.onnx", "-o", "OUT/m.so"], "no such file"),
    # run (more in tests/backends/test_deploy.py)
    (["run", "OUT/m.so", "-i", "OUT/x.npy"], "x.npy"),
    (["run", "OUT/m.so", "-i", "OUT/x.npy", "-o", "OUT/y.txt"], "must end in .npy or .npz"),
    (["run", "OUT/m.so"], "required: -i/--input"),
    (["run", "OUT/m.so", "-i", "OUT/x.npy", "--repeat", "0"], "positive integer"),
    # tune
    (["tune", "dcnet", "--trials", "-1", "--db", "OUT/db"], "integer >= 0"),
    (["tune", "dcnet", "--trials", "4", "--min-trials", "0", "--db", "OUT/db"], "positive integer"),
    (["tune", "dcnet"], "give a budget: --trials N, --minutes M"),
    (["tune", "dcnet", "--minutes", "0", "--db", "OUT/db"], "must be > 0"),
    (["tune", "dcnet", "--trials", "4", "--search", "all", "--db", "OUT/db"], "invalid choice: 'all'"),
    (["tune", "dcnet", "--minutes", "soon", "--db", "OUT/db"], "expected a number of minutes"),
    (["tune", "dcnet", "--cost", "cycles", "--db", "OUT/db"], "invalid choice: 'cycles'"),
    (["tune", "dcnet", "--cost", "instructions", "--db", "OUT/db"], "not an ARM target"),
    (["tune", "dcnet", "--cost", "instructions", "--target", "arm", "--rpc", "h:1", "--key", "k",
      "--db", "OUT/db"], "leave out --rpc"),
    (["tune", "nosuch", "--trials", "4", "--db", "OUT/db"], "unknown model 'nosuch'"),
    (["tune", "dcnet", "--trials", "4", "--target", "nosuch", "--db", "OUT/db"], "nosuch"),
    (["tune", "dcnet", "--trials", "4", "--db", "OUT/a/b"], "no such directory"),
    (["tune", "dcnet", "--trials", "4", "--rpc", "localhost", "--key", "x", "--db", "OUT/db"], "HOST:PORT"),
    (["tune", "dcnet", "--trials", "4", "--rpc", "localhost:9190", "--db", "OUT/db"], "go together"),
    (["tune", "dcnet", "--trials", "4", "--input-shape", "1,5,64,64", "--db", "OUT/db"], "does not take"),
    (["tune", "dcnet", "--trials", "4", "--plan", "x", "--db", "OUT/db"], "invalid choice: 'x'"),
    (["tune", "dcnet", "--trials", "4", "--layout", "x", "--db", "OUT/db"], "invalid choice: 'x'"),
    (["tune", "dcnet", "--trials", "4", "--cost-model", "mlp", "--db", "OUT/db"], "invalid choice: 'mlp'"),
    (["tune", "dcnet", "--trials", "4", "--json", "OUT/r.csv", "--db", "OUT/db"], "must end in .json"),
    (["tune", "dcnet", "--trials", "4", "--kernels", "nosuch", "--db", "OUT/db"], "nosuch"),
    # train
    (["train", "--norm", "layernorm"], "invalid choice: 'layernorm'"),
    (["train", "--batch-size", "0"], "positive integer"),
    (["train", "--depth", "medium"], "invalid choice: 'medium'"),
    (["train", "--epochs", "0"], "positive integer"),
    (["train", "--seed", "x"], "invalid int value"),
    (["train", "--lr", "-0.1"], "positive finite number"),
    (["train", "--lr", "nan"], "positive finite number"),
    (["train", "--json", "OUT/missing/r.json"], "no such directory"),
    (["train", "--threads", "0"], "positive integer"),
    (["train", "--init", "orthogonal"], "invalid choice: 'orthogonal'"),
    (["train", "--val-fraction", "0.7"], "expected a fraction in [0, 0.5)"),
    (["train", "--val-fraction", "x"], "expected a fraction in [0, 0.5)"),
    # bench
    (["bench", "level9"], "invalid choice: 'level9'"),
    (["bench", "op", "--shapes", "nosuch", "--out", "OUT/res"], "unknown block 'nosuch'"),
    (["bench", "model", "--models", "resnet1", "--out", "OUT/res"], "unknown model 'resnet1'"),
    (["bench", "model", "--models", "pytorchcv:no.such", "--out", "OUT/res"], "no pytorchcv model no.such"),
    (["bench", "op", "--batch", "0", "--out", "OUT/res"], "positive integer"),
    (["bench", "op", "--repeats", "0", "--out", "OUT/res"], "positive integer"),
    (["bench", "op", "--threads", "0", "--out", "OUT/res"], "positive integer"),
    (["bench", "op", "--tune", "-2", "--out", "OUT/res"], "integer >= 0"),
    (["bench", "op", "--tune", "4", "--out", "OUT/res"], "needs --db"),
    (["bench", "op", "--db", "OUT/nodb", "--out", "OUT/res"], "no such directory"),
    (["bench", "op", "--out", "OUT/a/b"], "no such directory"),
    (["bench", "gpu", "--gpu-mode", "x", "--out", "OUT/res"], "invalid choice: 'x'"),
]


def _id(case: tuple[list[str], str]) -> str:
    return " ".join(case[0]).replace("OUT/", "")


@pytest.mark.parametrize("argv, message", CASES, ids=[_id(c) for c in CASES])
def test_a_wrong_value_is_one_line_a_nonzero_exit_and_no_file(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.strip().splitlines() if ln.strip()]
    prefixes = (f"dcgraph {argv[0]}: error:", f"dcgraph {' '.join(argv[:2])}: error:")
    assert code not in (0, None), captured
    assert "Traceback" not in captured.err and sum(": error:" in ln for ln in lines) == 1, lines
    assert lines[-1].startswith(prefixes), lines
    assert message in lines[-1], lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a file was written"


def test_every_option_of_every_command_has_a_case():
    """A new option gets a wrong-value case here (or is a flag, which takes no value)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    tried = {(argv[0], a) for argv, _ in CASES for a in argv if a.startswith("-")}
    missing = []
    for name, command in sub.choices.items():
        parsers = [command]
        nested = [a for a in command._actions if getattr(a, "choices", None) and a.dest == "onnx_command"]
        for action in nested:
            parsers = list(action.choices.values())
        for p in parsers:
            for action in p._actions:
                if not action.option_strings or action.nargs == 0 or action.dest == "help":
                    continue
                if not any((name, opt) in tried for opt in action.option_strings):
                    missing.append(f"{name} {action.option_strings[-1]}")
    assert not missing, missing


def test_help_texts_are_printed_as_written(capsys):
    for name in ("demo", "convert", "compile", "run", "tune", "train", "bench"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "%%" not in out and f"dcgraph {name}" in out, name
