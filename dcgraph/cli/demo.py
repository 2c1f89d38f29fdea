"""``dcgraph demo``: the main job on the built-in model (rewrite, compile with TVM, train)."""

from __future__ import annotations

import argparse
import sys

from dcgraph.argtypes import positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="the main job: rewrite the built-in ResNet-18, compile it with TVM, train with Deep Control",
        description="1. Convert and fuse the built-in ResNet-18-like BatchNorm model into Deep "
                    "Control (exact), verify it, print the rewrite report; compile it through TVM "
                    "for this CPU, verify that against PyTorch, time inference of all three. "
                    "2. Build the built-in DCNet with fused Deep Control blocks, with Deep Control "
                    "as plain ops (same weights) and with BatchNorm; check that fused and plain "
                    "agree; time a training step of each and count the bytes autograd saves.")
    demo.add_argument("--batch", type=positive, default=8, help="batch size (default 8)")
    demo.add_argument("--size", type=positive, default=64,
                      help="input height and width (default 64)")
    demo.add_argument("--repeats", type=positive, default=10,
                      help="timed steps per variant (default 10)")
    demo.add_argument("--threads", type=positive, default=2,
                      help="torch intra-op threads (default 2)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dcgraph import demo

    torch.set_num_threads(args.threads)
    print(demo.rewrite_section(args.batch, args.repeats))
    print()
    results, agreement = demo.run(args.batch, args.size, args.repeats, args.threads,
                                  progress=not args.no_progress and sys.stderr.isatty())
    print(demo.report(results, agreement, args.batch, args.size))
    return 0
