"""The ``dcgraph`` command line."""

from __future__ import annotations

import argparse
import sys

from dcgraph import __version__

DESCRIPTION = """\
dcgraph: Deep Control (arXiv 1706.03907) as a compiler-level graph transformation.

Deep Control replaces batch normalisation in a conv block with a per-sample automatic gain
control: out = act(g * (conv(x) - a * mean(conv(x))) + b), per sample and channel. dcgraph
provides the operator (PyTorch modules and a fused custom op), graph passes that rewrite
conv + norm blocks into it, and TVM kernels for x86, ARM and NVIDIA GPUs.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcgraph", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dcgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run the built-in Deep Control network forward and backward, three ways",
        description="Build the built-in DCNet with fused Deep Control blocks, with Deep Control "
                    "as plain ops (same weights) and with BatchNorm; check that fused and plain "
                    "agree; time a training step of each and count the bytes autograd saves.")
    demo.add_argument("--batch", type=_positive, default=8, help="batch size (default 8)")
    demo.add_argument("--size", type=_positive, default=64,
                      help="input height and width (default 64)")
    demo.add_argument("--repeats", type=_positive, default=10,
                      help="timed steps per variant (default 10)")
    demo.add_argument("--threads", type=_positive, default=2,
                      help="torch intra-op threads (default 2)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from dcgraph import demo

    results, agreement = demo.run(args.batch, args.size, args.repeats, args.threads,
                                  progress=not args.no_progress and sys.stderr.isatty())
    print(demo.report(results, agreement, args.batch, args.size))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return {"demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
