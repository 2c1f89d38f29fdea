"""``dcgraph compile``: a model through TVM for x86, ARM or an NVIDIA GPU; verified, timed, exported."""

from __future__ import annotations

import argparse
import os
import sys
import time

from dcgraph.argtypes import input_shape, output_file, positive
from dcgraph.compare import relative_error

from ._args import reference_output, tvm_model


def add_parser(sub: argparse._SubParsersAction) -> None:
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
               "Without --db, the tuning records dcgraph ships for the target's CPU family apply "
               "where they match a kernel (the built-in zoo at 224 px, and whatever shares its "
               "convolutions; --no-shipped leaves them out); other kernels use dcgraph's default "
               "schedules (reported as UNTUNED). Load the library with dcgraph.backends.tvm.load(OUTPUT).")
    cp.add_argument("model", metavar="MODEL")
    cp.add_argument("--target", default="x86", help="x86 | arm | cuda | cuda-sm80 | JSON dict (default x86)")
    cp.add_argument("-o", "--output", type=output_file(".so"), metavar="OUTPUT",
                    help="shared library to write (.so)")
    cp.add_argument("--input-shape", type=input_shape, metavar="N,C,H,W",
                    help="input shape (default: the model's)")
    cp.add_argument("--plan", choices=["auto", "hoisted", "two_pass"], default="auto",
                    help="fused kernel form: hoisted (mean from the input, one pass over the output), "
                         "two_pass (conv, then mean and epilogue over its output), auto (default: "
                         "two_pass for depthwise convs, where the hoisted mean costs as much as the "
                         "conv; hoisted otherwise)")
    cp.add_argument("--layout", choices=["auto", "blocked", "nchw"], default="auto",
                    help="tensor layout of the kernels: blocked (NCHW[x]c, x = the target's float32 vector "
                         "lanes; layout changes only at the model's edges), nchw, auto (default: blocked on "
                         "CPU targets, nchw on GPUs)")
    cp.add_argument("--no-winograd", action="store_true",
                    help="keep every conv direct (by default, in the blocked layout, 3x3 stride-1 convs "
                         "run as Winograd F(m,3): 1.3-2.6x faster, float32 error ~1e-6 of the output's "
                         "range, their weights 1.8-4x larger)")
    cp.add_argument("--max-batch", type=positive, metavar="N",
                    help="take any batch size: compile batch buckets 1, 2, 4, ... up to N into the one "
                         "library (exact for models whose samples do not interact, which is checked)")
    cp.add_argument("--db", metavar="DIR", help="MetaSchedule database of tuned records to apply")
    cp.add_argument("--no-shipped", action="store_true",
                    help="without --db: do not apply dcgraph's shipped tuning records either")
    cp.add_argument("--no-convert", action="store_true", help="compile as is (no norm conversion)")
    cp.add_argument("--verify", action="store_true",
                    help="for arm: run the compiled model on the emulated ARM RPC server and compare")
    cp.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    cp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import statistics

    import torch

    from dcgraph.backends.tvm import compiler, targets

    target = targets.resolve(args.target)
    if args.db:  # a missing or empty database is said before any work
        from dcgraph.backends.tvm.database import open_database

        open_database(args.db, target)
    model, shape = tvm_model(args.model, args.input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    print(f"compiling {args.model} {tuple(shape)} for {targets.describe(target)} ...", file=sys.stderr)
    start = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    compiled = compiler.compile(model, target, example, plan=args.plan, layout=args.layout,
                                convert=not args.no_convert, database=args.db, max_batch=args.max_batch,
                                progress=progress, winograd=not args.no_winograd, shipped=not args.no_shipped)
    progress("compiled")
    print(compiled.summary())
    runner, server = None, None
    if targets.runs_here(target):
        runner = compiled
    elif args.verify and targets.is_arm(target):
        from dcgraph.backends.tvm import remote

        root = remote.ensure_arm_root(progress=lambda m: print(m, file=sys.stderr))
        server = remote.ArmRpcServer(root).__enter__()
        runner = compiled.remote(server.connect())
    try:
        if runner is not None and not args.no_verify:
            got = runner(example)
            want = reference_output(model, example)
            err = relative_error(got, want)  # NaN, infinity or a wrong shape: inf
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
