"""The ``dcgraph`` command line: one module per command, each with ``add_parser(sub)`` and ``run(args)``.

``demo`` (the main job), ``convert`` (torch passes), ``onnx`` (ONNX rules), ``compile`` and
``tune`` (TVM), ``run`` (an exported library on TVM's runtime alone), ``train`` (the digits
study), ``bench`` (the fusion suite). Errors the user can fix are printed in one line
(``dcgraph <command>: error: ...``) with exit code 1, never as a traceback from deep inside TVM.
"""

from __future__ import annotations

import argparse
import sys

from dcgraph import __version__
from dcgraph.argtypes import OneLineParser

from . import bench, compile, convert, demo, onnx, run, train, tune

DESCRIPTION = """\
dcgraph: Deep Control (arXiv 1706.03907) as a compiler-level graph transformation.

Deep Control replaces batch normalisation in a conv block with a per-sample automatic gain
control: out = act(g * (conv(x) - a * mean(conv(x))) + b), per sample and channel. dcgraph
provides the operator (PyTorch modules and a fused custom op), graph passes that rewrite
conv + norm blocks into it, and TVM kernels for x86, ARM and NVIDIA GPUs.
"""

#: the commands, in the order ``--help`` lists them
MODULES = (demo, convert, onnx, compile, run, tune, train, bench)
COMMANDS = {m.__name__.rsplit(".", 1)[1]: m.run for m in MODULES}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dcgraph", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dcgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in MODULES:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch.export's own deprecation noise (pytree LeafSpec) is not the user's concern
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser: "dcgraph demo: error: unrecognized arguments: ..."
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        (sub.choices[args.command] if args.command else parser).error(
            f"unrecognized arguments: {' '.join(extra)}")
    if argv is None and args.command == "bench":  # the console script: torch's threads passive
        from dcgraph.bench.harness import rerun_with_passive_openmp

        rerun_with_passive_openmp("dcgraph.cli")
    if args.command is None:
        parser.print_help()
        return 0
    from dcgraph.models import ModelSpecError
    from dcgraph.passes.fx import TraceFailure
    from dcgraph.passes.verify import VerificationError

    try:
        return args.run(args)
    except (ModelSpecError, ValueError, TraceFailure, VerificationError, OSError) as e:
        # OnnxFileError, CompileError and TargetError are ValueErrors
        print(f"dcgraph {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _from_tvm_or_emulation(e):
            raise
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        print(f"dcgraph {args.command}: error: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
        return 1


def _from_tvm_or_emulation(e: BaseException) -> bool:
    """TVM's errors and the ARM emulation's are reported in one line, not as a deep traceback."""
    module = type(e).__module__ or ""
    return module.startswith(("tvm", "dcgraph.backends")) or "TVM" in type(e).__name__
