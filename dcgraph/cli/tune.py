"""``dcgraph tune``: MetaSchedule autotuning of a model's kernels (here, or over TVM RPC)."""

from __future__ import annotations

import argparse
import os
import sys

from dcgraph.argtypes import input_shape, non_negative, output_dir, output_file, positive

from ._args import tvm_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    tu = sub.add_parser(
        "tune", help="autotune a model's kernels with MetaSchedule (here, or on devices over TVM RPC)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import MODEL as `compile` does, extract its kernels (the fused Deep Control "
                    "kernels and TVM's own), spread TRIALS (and/or MINUTES) across them by FLOPs x calls "
                    "(at least --min-trials each; kernels under 1% of the FLOPs keep the default "
                    "schedule) and tune them, with a progress bar. A kernel whose default schedule has "
                    "knobs (the blocked conv's register tile, the Winograd GEMM's, the depthwise row "
                    "tile) is tuned over those knobs: every candidate a variant of the default, the "
                    "default measured first; other kernels get MetaSchedule's search. Every measured "
                    "candidate is first checked against the kernel's reference on fixed inputs (wrong "
                    "results are reported and never used) and stored in DB/<target key>/ as it is "
                    "measured. Before a candidate replaces the default, it is re-measured interleaved "
                    "with it (a tuned build is never slower than the default here). Prints a table "
                    "of the tasks: trials, best time, default time, what compile will use, speed-up.",
        epilog="TRIALS is the total for the model, and a target: trials already in the database "
               "count, so running the same command again\nresumes an interrupted run (Ctrl-C or a "
               "killed process keeps every measured trial) and a larger TRIALS spends the difference.\n"
               "--rpc HOST:PORT --key NAME: build here, measure on the devices registered with a TVM "
               "RPC tracker, e.g.\n"
               "  python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190 --port-end 9191\n"
               "  python -m tvm.exec.rpc_server --tracker 127.0.0.1:9190 --key x86   (on each device)\n"
               "  dcgraph tune resnet18 --trials 200 --rpc 127.0.0.1:9190 --key x86\n"
               "For --target arm, the emulated arm64 server of dcgraph.backends.tvm.remote "
               "registers the same way (ArmRpcServer(tracker=..., key=...)).\n"
               "Cost model: XGBoost when xgboost is installed, else random (said in the output).\n"
               "Then: dcgraph compile MODEL --target TARGET --db DB uses the records "
               "(its summary counts the tuned kernels).")
    tu.add_argument("model", metavar="MODEL",
                    help="as for compile: built-in name, module:factory, .pt2, .onnx")
    tu.add_argument("--target", default="x86", help="x86 | arm | JSON dict | 'llvm -mcpu=...' (default x86)")
    tu.add_argument("--trials", type=non_negative, metavar="TRIALS",
                    help="total trials for the model (a target, see below); give --trials, --minutes or both")
    tu.add_argument("--minutes", type=positive_float, metavar="M",
                    help="wall-time budget: stop taking new candidates after M minutes (each kernel "
                         "gets a share by FLOPs x calls); alone, every knob space is measured whole "
                         "as far as the time goes")
    tu.add_argument("--min-trials", type=positive, default=8, metavar="N",
                    help="trials every tuned kernel gets at least (default 8)")
    tu.add_argument("--kernels", metavar="NAME,...",
                    help="tune only these kernels (names as in the table; default: all worth tuning)")
    tu.add_argument("--db", default="tuning-db", type=output_dir, metavar="DIR",
                    help="tuning database directory, one sub-database per target (default ./tuning-db)")
    tu.add_argument("--rpc", type=host_port, metavar="HOST:PORT", help="TVM RPC tracker to measure on")
    tu.add_argument("--key", metavar="NAME", help="device key at the tracker")
    tu.add_argument("--input-shape", type=input_shape, metavar="N,C,H,W",
                    help="input shape (default: the model's)")
    tu.add_argument("--plan", choices=["auto", "hoisted", "two_pass"], default="auto",
                    help="fused kernel form, as for compile (default auto)")
    tu.add_argument("--layout", choices=["auto", "blocked", "nchw"], default="auto",
                    help="tensor layout, as for compile (default auto); records apply to builds of the "
                         "same layout")
    tu.add_argument("--no-winograd", action="store_true",
                    help="tune the direct kernels of 3x3 stride-1 convs, as for compile --no-winograd")
    tu.add_argument("--search", choices=["auto", "knobs"], default="auto",
                    help="auto (default): each kernel's knob space where its default schedule has one, "
                         "MetaSchedule's search for the others; knobs: only the kernels with knobs")
    tu.add_argument("--cost", choices=["time", "instructions"], default="time",
                    help="what a candidate is judged by: time (measured here or over --rpc) or instructions "
                         "(ARM targets: executed instructions on the emulated aarch64 CPU, every point of "
                         "each kernel's knob space counted; deterministic, no --trials or --minutes needed)")
    tu.add_argument("--cost-model", choices=["auto", "xgb", "random"], default="auto",
                    help="MetaSchedule cost model (default auto: xgb if installed, else random)")
    tu.add_argument("--no-convert", action="store_true", help="tune as is (no norm conversion)")
    tu.add_argument("--no-progress", action="store_true", help="no progress bar")
    tu.add_argument("--json", type=output_file(".json"), metavar="PATH", help="also write the report as JSON")
    tu.set_defaults(run=run)


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (a port 1-65535), got {text!r}")
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from dcgraph.backends.tvm import targets
    from dcgraph.backends.tvm.tuning import TuneError, tune

    if (args.rpc is None) != (args.key is None):
        raise ValueError("--rpc HOST:PORT and --key NAME go together")
    if args.trials is None and args.minutes is None and args.cost == "time":
        raise ValueError("give a budget: --trials N, --minutes M, or both")
    if args.cost == "instructions" and args.rpc:
        raise ValueError("--cost instructions counts on the emulated CPU here: leave out --rpc")
    target = targets.resolve(args.target)
    model, shape = tvm_model(args.model, args.input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    where = f"devices {args.key!r} of tracker {args.rpc}" if args.rpc else "this machine"
    print(f"tuning {args.model} {tuple(shape)} for {targets.describe(target)} on {where}: "
          f"{budget(args)}, database {args.db}", file=sys.stderr)
    try:
        report = tune(model, target, example, trials=args.trials, minutes=args.minutes, db=args.db,
                      rpc=args.rpc, key=args.key,
                      cost_model=args.cost_model, progress=not args.no_progress and sys.stderr.isatty(),
                      convert=not args.no_convert, plan=args.plan, layout=args.layout,
                      winograd=not args.no_winograd, min_trials=args.min_trials, search=args.search,
                      cost=args.cost,
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


def budget(args: argparse.Namespace) -> str:
    parts = []
    if args.trials is not None:
        parts.append(f"{args.trials} trials")
    if args.minutes is not None:
        parts.append(f"{args.minutes:g} minutes")
    if args.cost == "instructions":
        parts.append("every knob-space point, by executed instructions")
    return " or ".join(parts)
