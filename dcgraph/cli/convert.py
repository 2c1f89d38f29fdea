"""``dcgraph convert``: a PyTorch model's conv + norm blocks rewritten into fused Deep Control (.pt2)."""

from __future__ import annotations

import argparse
import sys

from dcgraph.argtypes import input_shape, output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser(
        "convert", help="rewrite a model's conv + norm blocks into fused Deep Control blocks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export MODEL with torch.export, convert every conv -> BatchNorm / InstanceNorm "
                    "/ GroupNorm [-> activation] into Deep Control, fuse conv + Deep Control "
                    "[+ activation] into the dcgraph::conv_deep_control op, check the result, "
                    "print the rewrite report and write a torch.export archive (.pt2).",
        epilog="MODEL is a built-in name (resnet18, mobilenet_v2, efficientnet, vgg, two_users, "
               "dcnet) or package.module:factory, a callable returning an nn.Module.\n"
               "The archive loads with: import dcgraph, torch; torch.export.load(PATH).\n"
               "With --init preserve (default) the rewrite is exact for BatchNorm in eval mode "
               "and is verified in float64;\n--init fresh is the paper's start for training "
               "from scratch (a=1, g=gamma, b=beta), approximate by design.")
    conv.add_argument("model", metavar="MODEL")
    conv.add_argument("-o", "--output", type=output_file(".pt2"),
                      help="where to write the .pt2 archive (default: none)")
    conv.add_argument("--init", choices=["preserve", "fresh"], default="preserve",
                      help="initial a, g, b for converted norms (default preserve)")
    conv.add_argument("--no-fuse", action="store_true",
                      help="stop after the conversion (conv -> DeepControl modules, not fused)")
    conv.add_argument("--input-shape", type=input_shape, metavar="N,C,H,W",
                      help="example input shape (default: the built-in model's, else 1,3,224,224)")
    conv.add_argument("--static-batch", action="store_true",
                      help="export with a fixed batch size instead of a dynamic one")
    conv.add_argument("--no-verify", action="store_true", help="skip the numerical check")
    conv.add_argument("--json", type=output_file(".json"), metavar="PATH",
                      help="also write the report as JSON")
    conv.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import warnings

    import torch

    from dcgraph.models import check_input, load_model, parse_shape, save_program
    from dcgraph.passes.pipeline import convert_model

    model, default_shape = load_model(args.model)
    shape = parse_shape(args.input_shape) if args.input_shape else default_shape or (1, 3, 224, 224)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    check_input(model, example, args.model)
    print(f"converting {args.model} {tuple(shape)}: torch.export, norms -> Deep Control"
          + ("" if args.no_fuse else ", fusion") + ("" if args.no_verify else ", float64 check") + " ...",
          file=sys.stderr, flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = convert_model(model, example, args.init, fuse_blocks=not args.no_fuse,
                               dynamic_batch=not args.static_batch, verify=not args.no_verify)
    for w in caught:
        if "dcgraph" in (w.filename or "") or "Approximate" in type(w.message).__name__:
            print(f"warning: {w.message}", file=sys.stderr)
    print(result.report)
    if result.float64_error is not None:
        print(f"verified: rewritten vs original, relative error {result.float64_error:.1e} in "
              f"float64, {result.float32_error:.1e} in float32")
    elif not args.no_verify and result.report.matches:
        print("not verified numerically: some conversions are approximate by design")
    if args.output:
        save_program(result.program, args.output)
        print(f"wrote {args.output}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.report.to_dict(), f, indent=2)
    return 0
