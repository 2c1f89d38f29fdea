"""``dcgraph onnx convert|export``: ONNX in, ONNX out, with the ``ai.dcgraph`` operators."""

from __future__ import annotations

import argparse
import os
import sys

from dcgraph.argtypes import input_shape, output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    onnx_p = sub.add_parser("onnx", help="ONNX in, ONNX out: convert norms to Deep Control, fuse",
                            description="Rewrite ONNX models with the ai.dcgraph operators "
                                        "(shipped in the model as functions; any runtime runs "
                                        "them with no plugin).")
    onnx_sub = onnx_p.add_subparsers(dest="onnx_command", metavar="COMMAND", required=True)
    oc = onnx_sub.add_parser(
        "convert", help="convert Conv -> norm [-> act] to Deep Control and fuse",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check INPUT with onnx.checker, convert every Conv -> BatchNormalization / "
                    "InstanceNormalization / GroupNormalization [-> activation] into "
                    "ai.dcgraph.DeepControl, fuse Conv + Deep Control (node or plain ops) "
                    "[+ activation] into ai.dcgraph.DeepControlConv, validate the result and "
                    "write it atomically (the input is never touched).",
        epilog="Models with external data (weights in a side file) are read with it and "
               "written with it (OUTPUT.data beside OUTPUT).\nWith --verify, both models run in "
               "onnxruntime on random inputs: the original against the result when every "
               "conversion is exact,\nelse the converted model against the fused one (fusion "
               "is always exact); float32, relative tolerance 1e-4.")
    oc.add_argument("input", metavar="INPUT")
    oc.add_argument("-o", "--output", required=True, type=output_file(".onnx"), metavar="OUTPUT")
    oc.add_argument("--init", choices=["preserve", "fresh"], default="preserve")
    oc.add_argument("--no-fuse", action="store_true", help="convert only (DeepControl nodes)")
    oc.add_argument("--verify", action="store_true", help="compare in onnxruntime (see below)")
    oc.add_argument("--input-shape", type=input_shape, metavar="N,C,H,W",
                    help="shape for --verify if dims are symbolic")
    oc.add_argument("--json", type=output_file(".json"), metavar="PATH", help="also write the report as JSON")
    oe = onnx_sub.add_parser("export", help="export a PyTorch model to ONNX, norms kept",
                             description="Export MODEL (built-in name or package.module:factory) "
                                         "with the dynamo exporter, BatchNorm not folded into "
                                         "Conv; with --fused, convert and fuse in PyTorch first "
                                         "(dcgraph::conv_deep_control -> ai.dcgraph.DeepControlConv).")
    oe.add_argument("model", metavar="MODEL")
    oe.add_argument("-o", "--output", required=True, type=output_file(".onnx"))
    oe.add_argument("--fused", action="store_true", help="rewrite with the torch passes first")
    oe.add_argument("--input-shape", type=input_shape, metavar="N,C,H,W")
    onnx_p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from dcgraph import onnx_ops, onnx_tools
    from dcgraph.models import parse_shape

    shape = parse_shape(args.input_shape) if args.input_shape else None
    if args.onnx_command == "export":
        import torch

        from dcgraph.models import check_input, load_model
        from dcgraph.onnx_export import export_onnx

        model, default_shape = load_model(args.model)
        model.eval()
        if args.fused:
            from dcgraph.passes.fx import rewrite

            model, report = rewrite(model)
            print(report.summary())
        example = torch.randn(*(shape or default_shape or (1, 3, 224, 224)))
        check_input(model, example, args.model)
        print(f"exporting {args.model} {tuple(example.shape)} with the dynamo exporter ...",
              file=sys.stderr, flush=True)
        onnx_tools.save_atomic(export_onnx(model, example), args.output)
        print(f"wrote {args.output}")
        return 0

    from dcgraph.passes.onnx import rewrite_onnx

    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError("OUTPUT must differ from INPUT (the input is never modified)")
    model = onnx_tools.load_checked(args.input)
    if not any(n.op_type == "Conv" for n in model.graph.node):
        raise onnx_tools.OnnxFileError(f"{args.input}: the model has no Conv node: nothing to convert")
    external = onnx_tools.uses_external_data(args.input)
    print(f"rewriting {args.input} ...", file=sys.stderr, flush=True)
    out, report = rewrite_onnx(model, args.init, fuse=not args.no_fuse)
    try:
        onnx_ops.check(out)
    except Exception as e:  # a bug of ours, never a file to write
        raise onnx_tools.OnnxFileError(f"the rewritten model does not validate: {e}") from e
    print(report)
    if args.verify and report.matches:
        if report.exact:
            err, what = onnx_tools.compare(model, out, shape), "original vs rewritten"
        else:
            converted, _ = rewrite_onnx(model, args.init, fuse=False)
            err, what = onnx_tools.compare(converted, out, shape), "converted vs fused"
        if not err <= 1e-4:
            from dcgraph.passes.verify import VerificationError

            raise VerificationError(f"{what}: relative difference {err:.1e} > 1e-4 in onnxruntime")
        print(f"verified in onnxruntime ({what}): relative difference {err:.1e}")
    onnx_tools.save_atomic(out, args.output, external_data=external)
    print(f"wrote {args.output}" + (" (+ external data)" if external else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0
