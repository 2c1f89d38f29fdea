"""``dcgraph bench``: the operator fusion benchmark suite (``dcgraph.bench``), side by side."""

from __future__ import annotations

import argparse

from dcgraph.bench.run import add_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="the operator fusion benchmark suite: dcgraph against the peers, side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Op level (conv + Deep Control + act on ResNet-18, MobileNetV2 and EfficientNet-B0 "
                    "shapes: PyTorch, torch.compile, ONNX Runtime, TVM, dcgraph's fused paths), model "
                    "level (whole models), training level (time, saved bytes, peak RSS), GPU level. "
                    "Every row is checked against the reference before it is timed.",
        epilog="Results: OUT/fusion_<level>[_quick].{json,md,png} (--out, default ./bench-results). "
               "Installed with dcgraph (dcgraph.bench): no source checkout needed.")
    add_arguments(bench)
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dcgraph.bench.run import run as run_suite

    return run_suite(args)
