"""The ``dcgraph`` command line."""

from __future__ import annotations

import argparse
import os
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


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcgraph", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dcgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="the main job: rewrite the built-in ResNet-18, compile it with TVM, train with Deep Control",
        description="1. Convert and fuse the built-in ResNet-18-like BatchNorm model into Deep "
                    "Control (exact), verify it, print the rewrite report; compile it through TVM "
                    "for this CPU, verify that against PyTorch, time inference of all three. "
                    "2. Build the built-in DCNet with fused Deep Control blocks, with Deep Control "
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
    conv.add_argument("-o", "--output", help="where to write the .pt2 archive (default: none)")
    conv.add_argument("--init", choices=["preserve", "fresh"], default="preserve",
                      help="initial a, g, b for converted norms (default preserve)")
    conv.add_argument("--no-fuse", action="store_true",
                      help="stop after the conversion (conv -> DeepControl modules, not fused)")
    conv.add_argument("--input-shape", metavar="N,C,H,W",
                      help="example input shape (default: the built-in model's, else 1,3,224,224)")
    conv.add_argument("--static-batch", action="store_true",
                      help="export with a fixed batch size instead of a dynamic one")
    conv.add_argument("--no-verify", action="store_true", help="skip the numerical check")
    conv.add_argument("--json", metavar="PATH", help="also write the report as JSON")

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
    oc.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    oc.add_argument("--init", choices=["preserve", "fresh"], default="preserve")
    oc.add_argument("--no-fuse", action="store_true", help="convert only (DeepControl nodes)")
    oc.add_argument("--verify", action="store_true", help="compare in onnxruntime (see below)")
    oc.add_argument("--input-shape", metavar="N,C,H,W", help="shape for --verify if dims are symbolic")
    oc.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    oe = onnx_sub.add_parser("export", help="export a PyTorch model to ONNX, norms kept",
                             description="Export MODEL (built-in name or package.module:factory) "
                                         "with the dynamo exporter, BatchNorm not folded into "
                                         "Conv; with --fused, convert and fuse in PyTorch first "
                                         "(dcgraph::conv_deep_control -> ai.dcgraph.DeepControlConv).")
    oe.add_argument("model", metavar="MODEL")
    oe.add_argument("-o", "--output", required=True)
    oe.add_argument("--fused", action="store_true", help="rewrite with the torch passes first")
    oe.add_argument("--input-shape", metavar="N,C,H,W")

    cp = sub.add_parser(
        "compile", help="compile a model through TVM for x86, ARM or an NVIDIA GPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert and fuse MODEL's conv + norm blocks into Deep Control (as `convert` "
                    "does), import it into TVM Relax with dcgraph's fused kernels, schedule and "
                    "compile it for TARGET, check it against PyTorch where the target runs here, "
                    "and write a deployable shared library OUTPUT (+ OUTPUT.json, its signature).",
        epilog="MODEL: a built-in name (resnet18, mobilenet_v2, efficientnet, vgg, dcnet), "
               "package.module:factory, a torch.export archive (.pt2) or an ONNX model (.onnx).\n"
               "TARGET: x86 (this CPU), arm (aarch64 + NEON, cross-compiled; --verify runs it "
               "under qemu), cuda (sm_90), cuda-sm80, a TVM target dict as JSON, a TVM tag, or "
               "'llvm -mcpu=...'.\n"
               "Without a tuning database the kernels use dcgraph's default schedules (reported "
               "as UNTUNED). Load the library with dcgraph.backends.tvm.load(OUTPUT).")
    cp.add_argument("model", metavar="MODEL")
    cp.add_argument("--target", default="x86", help="x86 | arm | cuda | cuda-sm80 | JSON dict (default x86)")
    cp.add_argument("-o", "--output", metavar="OUTPUT", help="shared library to write (.so)")
    cp.add_argument("--input-shape", metavar="N,C,H,W", help="input shape (default: the model's)")
    cp.add_argument("--plan", choices=["auto", "hoisted", "two_pass"], default="auto",
                    help="fused kernel form: hoisted (mean from the input, one pass over the output), "
                         "two_pass (conv, then mean and epilogue over its output), auto (default: "
                         "two_pass for depthwise convs, where the hoisted mean costs as much as the "
                         "conv; hoisted otherwise)")
    cp.add_argument("--db", metavar="DIR", help="MetaSchedule database of tuned records to apply")
    cp.add_argument("--no-convert", action="store_true", help="compile as is (no norm conversion)")
    cp.add_argument("--verify", action="store_true",
                    help="for arm: run the compiled model on the emulated ARM RPC server and compare")
    cp.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")

    tu = sub.add_parser(
        "tune", help="autotune a model's kernels with MetaSchedule (here, or on devices over TVM RPC)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import MODEL as `compile` does, extract its kernels (the fused Deep Control "
                    "kernels and TVM's own), spread TRIALS across them by FLOPs (at least --min-trials "
                    "each; kernels under 1%% of the FLOPs keep the default schedule) and tune them with "
                    "MetaSchedule, with a progress bar. Every measured candidate is first checked "
                    "against the kernel's reference on fixed inputs (wrong results are reported and "
                    "never used) and stored in DB/<target key>/ as it is measured. Prints a table of "
                    "the tasks: trials, best time, default-schedule time, what compile will use.",
        epilog="TRIALS is the total for the model, and a target: trials already in the database "
               "count, so running the same command again\nresumes an interrupted run (Ctrl-C or a "
               "killed process keeps every measured trial) and a larger TRIALS spends the difference.\n"
               "--rpc HOST:PORT --key NAME: build here, measure on the devices registered with a TVM "
               "RPC tracker, e.g.\n"
               "  python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190 --port-end 9191\n"
               "  python -m tvm.exec.rpc_server --tracker 127.0.0.1:9190 --key x86   (on each device)\n"
               "  dcgraph tune resnet18 --trials 200 --rpc 127.0.0.1:9190 --key x86\n"
               "For --target arm, the emulated arm64 server of dcgraph.backends.tvm.emulation "
               "registers the same way (ArmRpcServer(tracker=..., key=...)).\n"
               "Cost model: XGBoost when xgboost is installed, else random (said in the output).\n"
               "Then: dcgraph compile MODEL --target TARGET --db DB uses the records "
               "(its summary counts the tuned kernels).")
    tu.add_argument("model", metavar="MODEL",
                    help="as for compile: built-in name, module:factory, .pt2, .onnx")
    tu.add_argument("--target", default="x86", help="x86 | arm | JSON dict | 'llvm -mcpu=...' (default x86)")
    tu.add_argument("--trials", type=_non_negative, required=True, metavar="TRIALS",
                    help="total trials for the model (a target, see below)")
    tu.add_argument("--min-trials", type=_positive, default=8, metavar="N",
                    help="trials every tuned kernel gets at least (default 8)")
    tu.add_argument("--kernels", metavar="NAME,...",
                    help="tune only these kernels (names as in the table; default: all worth tuning)")
    tu.add_argument("--db", default="tuning-db", metavar="DIR",
                    help="tuning database directory, one sub-database per target (default ./tuning-db)")
    tu.add_argument("--rpc", metavar="HOST:PORT", help="TVM RPC tracker to measure on")
    tu.add_argument("--key", metavar="NAME", help="device key at the tracker")
    tu.add_argument("--input-shape", metavar="N,C,H,W", help="input shape (default: the model's)")
    tu.add_argument("--plan", choices=["auto", "hoisted", "two_pass"], default="auto",
                    help="fused kernel form, as for compile (default auto)")
    tu.add_argument("--cost-model", choices=["auto", "xgb", "random"], default="auto",
                    help="MetaSchedule cost model (default auto: xgb if installed, else random)")
    tu.add_argument("--no-convert", action="store_true", help="tune as is (no norm conversion)")
    tu.add_argument("--no-progress", action="store_true", help="no progress bar")
    tu.add_argument("--json", metavar="PATH", help="also write the report as JSON")

    tr = sub.add_parser(
        "train", help="train a small CNN on the digits data with a chosen normalisation",
        description="Train a small CNN on scikit-learn's handwritten digits (no download; 80/20 "
                    "stratified split, fixed seeds) with no norm, BatchNorm, GroupNorm or Deep "
                    "Control, and report test accuracy, epochs to 90%% and the activation bytes "
                    "autograd saves per step. benchmarks/train_grid.py runs the whole grid.")
    tr.add_argument("--norm", choices=["none", "batchnorm", "groupnorm", "deepcontrol",
                                       "deepcontrol_frozen_a"], default="deepcontrol")
    tr.add_argument("--batch-size", type=_positive, default=32)
    tr.add_argument("--depth", choices=["shallow", "deep"], default="shallow",
                    help="shallow: 3 conv blocks; deep: 12 plain blocks, no residuals")
    tr.add_argument("--epochs", type=_positive, default=10)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--lr", type=float, help="default: by batch size (1: 0.005, 4: 0.02, 32: 0.05)")
    tr.add_argument("--json", metavar="PATH", help="write the result (with the accuracy curve)")
    tr.add_argument("--threads", type=_positive, default=2)

    bench = sub.add_parser(
        "bench", help="the operator fusion benchmark suite: dcgraph against the peers, side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Op level (conv + Deep Control + act on ResNet-18, MobileNetV2 and EfficientNet-B0 "
                    "shapes: PyTorch, torch.compile, ONNX Runtime, TVM, dcgraph's fused paths), model "
                    "level (whole models), training level (time, saved bytes, peak RSS), GPU level. "
                    "Every row is checked against the reference before it is timed.",
        epilog="Results: benchmarks/results/fusion_<level>[_quick].{json,md,png}. Needs a source "
               "checkout (the benchmarks/ folder). See benchmarks/suite/__init__.py.")
    _bench_arguments(bench)
    return parser


def _suite_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "suite")


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's own options (benchmarks/suite/__main__.py), where the checkout has it."""
    import importlib.util

    path = os.path.join(_suite_dir(), "__main__.py")
    if not os.path.isfile(path):
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    spec = importlib.util.spec_from_file_location("_dcgraph_bench_args", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.add_arguments(p)


def _demo(args: argparse.Namespace) -> int:
    import torch

    from dcgraph import demo

    torch.set_num_threads(args.threads)
    print(demo.rewrite_section(args.batch, args.repeats))
    print()
    results, agreement = demo.run(args.batch, args.size, args.repeats, args.threads,
                                  progress=not args.no_progress and sys.stderr.isatty())
    print(demo.report(results, agreement, args.batch, args.size))
    return 0


def _convert(args: argparse.Namespace) -> int:
    import json
    import warnings

    import torch

    from dcgraph.models import load_model, parse_shape, save_program
    from dcgraph.passes.pipeline import convert_model

    model, default_shape = load_model(args.model)
    shape = parse_shape(args.input_shape) if args.input_shape else default_shape or (1, 3, 224, 224)
    if args.output and not args.output.endswith(".pt2"):
        raise ValueError(f"--output {args.output!r}: torch.export archives end in .pt2")
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
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


def _onnx(args: argparse.Namespace) -> int:
    import json

    from dcgraph import onnx_ops, onnx_tools
    from dcgraph.models import parse_shape

    shape = parse_shape(args.input_shape) if args.input_shape else None
    if args.onnx_command == "export":
        import torch

        from dcgraph.models import load_model
        from dcgraph.onnx_export import export_onnx

        model, default_shape = load_model(args.model)
        model.eval()
        if args.fused:
            from dcgraph.passes.fx import rewrite

            model, report = rewrite(model)
            print(report.summary())
        example = torch.randn(*(shape or default_shape or (1, 3, 224, 224)))
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


def _train(args: argparse.Namespace) -> int:
    import torch

    from dcgraph.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(args.norm, args.batch_size, args.depth, args.epochs, args.seed, args.lr)
    result = train(cfg.check(), progress=sys.stderr.isatty())
    target = (f"{result.epochs_to_target} epochs" if result.epochs_to_target is not None
              else "not reached")
    print(f"{args.norm}, batch {args.batch_size}, {args.depth}, seed {args.seed}: test accuracy "
          f"{result.test_accuracy:.4f} after {args.epochs} epochs ({result.seconds:.1f} s); "
          f"90% {target}; {result.saved_bytes_per_step / 1024:.1f} KiB saved per step")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(result.to_json())
        os.replace(tmp, args.json)
    return 0


def _tvm_model(spec: str, input_shape: str | None) -> tuple[object, tuple[int, ...]]:
    """(model, input shape) for compile / tune: a built-in or module:factory model (eval mode),
    a .pt2 program (needs the shape) or an .onnx model (its shape, or ``input_shape`` for symbolic dims)."""
    from dcgraph.backends.tvm import compiler
    from dcgraph.models import load_model, parse_shape

    override = parse_shape(input_shape) if input_shape else None
    if spec.endswith((".onnx", ".pt2")):
        if not os.path.isfile(spec):
            raise ValueError(f"no such file: {spec}")
        if spec.endswith(".onnx"):
            from dcgraph.onnx_tools import load_checked

            model = load_checked(spec)
            return model, compiler.onnx_input_shape(model, override)
        if override is None:
            raise ValueError("a .pt2 program needs --input-shape (the shape it was exported with)")
        return spec, override
    model, default_shape = load_model(spec)
    return model.eval(), override or default_shape or (1, 3, 224, 224)


def _compile(args: argparse.Namespace) -> int:
    import statistics

    import torch

    from dcgraph.backends.tvm import compiler, targets

    if args.output and not args.output.endswith(".so"):
        raise ValueError(f"--output {args.output!r}: the library must end in .so")
    target = targets.resolve(args.target)
    model, shape = _tvm_model(args.model, args.input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    print(f"compiling {args.model} {tuple(shape)} for {targets.describe(target)} ...", file=sys.stderr)
    compiled = compiler.compile(model, target, example, plan=args.plan, convert=not args.no_convert,
                                database=args.db)
    print(compiled.summary())
    runner, server = None, None
    if targets.runs_here(target):
        runner = compiled
    elif args.verify and targets.is_arm(target):
        from dcgraph.backends.tvm import emulation

        root = emulation.ensure_arm_root(progress=lambda m: print(m, file=sys.stderr))
        server = emulation.ArmRpcServer(root).__enter__()
        runner = compiled.remote(server.connect())
    try:
        if runner is not None and not args.no_verify:
            got = runner(example)
            want = compiler.reference_output(model, example)
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
            where = "here" if runner is compiled else "on emulated ARM (qemu)"
            print(f"verified {where}: max relative error vs the original model {err:.1e}")
            if not err <= 1e-4:
                raise ValueError(f"the compiled model differs from the original: relative error {err:.1e}")
        if runner is compiled:
            ms = statistics.median(compiled.time(example)) * 1e3
            print(f"latency: {ms:.3f} ms per call (batch {shape[0]}, median of 5 x 10 calls)")
    finally:
        if server is not None:
            server.stop()
    if args.output:
        compiled.export(args.output)
        print(f"wrote {args.output} (+ {os.path.basename(args.output)}.json)")
    return 0


def _tune(args: argparse.Namespace) -> int:
    import json

    import torch

    from dcgraph.backends.tvm import targets
    from dcgraph.backends.tvm.tuning import TuneError, tune

    if (args.rpc is None) != (args.key is None):
        raise ValueError("--rpc HOST:PORT and --key NAME go together")
    target = targets.resolve(args.target)
    model, shape = _tvm_model(args.model, args.input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    where = f"devices {args.key!r} of tracker {args.rpc}" if args.rpc else "this machine"
    print(f"tuning {args.model} {tuple(shape)} for {targets.describe(target)} on {where}: "
          f"{args.trials} trials, database {args.db}", file=sys.stderr)
    try:
        report = tune(model, target, example, trials=args.trials, db=args.db, rpc=args.rpc, key=args.key,
                      cost_model=args.cost_model, progress=not args.no_progress and sys.stderr.isatty(),
                      convert=not args.no_convert, plan=args.plan, min_trials=args.min_trials,
                      kernels=args.kernels.split(",") if args.kernels else None)
    except TuneError as e:
        if e.report is not None:
            print(e.report.table())
        raise
    print(report.table())
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        os.replace(tmp, args.json)
    if report.interrupted:
        print("interrupted: every measured trial is kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(f"use the records: dcgraph compile {args.model} --target {args.target} --db {args.db}",
          file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    suite = _suite_dir()
    if not os.path.isdir(suite):
        raise ValueError(f"dcgraph bench needs a source checkout: {suite} does not exist")
    root = os.path.dirname(os.path.dirname(suite))
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.suite.__main__ import run

    return run(args)


COMMANDS = {"demo": _demo, "convert": _convert, "onnx": _onnx, "train": _train,
            "compile": _compile, "tune": _tune, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch.export's own deprecation noise (pytree LeafSpec) is not the user's concern
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from dcgraph.models import ModelSpecError
    from dcgraph.passes.fx import TraceFailure
    from dcgraph.passes.verify import VerificationError

    try:
        return COMMANDS[args.command](args)
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


if __name__ == "__main__":
    sys.exit(main())
