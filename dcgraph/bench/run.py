"""``dcgraph bench [op|model|train|gpu|arm|all] [--quick] [--db DIR] [--out DIR]``
(= ``python -m dcgraph.bench``)."""

from __future__ import annotations

import argparse
import sys
import time

from dcgraph.argtypes import OneLineParser, non_negative, output_dir, positive

LEVELS = ("op", "model", "train", "gpu", "arm", "all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``dcgraph bench`` (shared with ``python -m dcgraph.bench``)."""
    p.add_argument("level", nargs="?", choices=LEVELS, default="all",
                   help="op: one conv + Deep Control block per shape; model: whole models; train: a "
                        "training step; gpu: the op level on CUDA; arm: the op and model levels on "
                        "emulated aarch64, in executed instructions (qemu + a counting plugin, set up on "
                        "first use; a few minutes); all (default): op, model, train, and gpu where a GPU "
                        "is present")
    p.add_argument("--quick", action="store_true",
                   help="few shapes, batch 1, few repeats: a smoke test (CI); no timing assertions")
    p.add_argument("--db", type=output_dir, metavar="DIR",
                   help="MetaSchedule tuning database (dcgraph tune) for the tuned TVM rows")
    p.add_argument("--tune", type=non_negative, default=0, metavar="TRIALS",
                   help="op and model levels: first tune the TVM kernels of every block / model into --db "
                        "with dcgraph.backends.tvm.tuning (TRIALS per block or model; resumes, so a second "
                        "run costs nothing); about 4 s per trial on 2 cores. arm level: any TRIALS tunes "
                        "every knob-space point on executed instructions (--cost instructions)")
    p.add_argument("--out", type=output_dir, metavar="DIR", default="bench-results",
                   help="where the results go: fusion_<level>[_quick].{json,md,png} (default "
                        "./bench-results; the repository's committed results are benchmarks/results)")
    p.add_argument("--threads", type=positive, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--repeats", type=positive,
                   help="timed samples per row (default: 20 op, 10 model; quick 5/3)")
    p.add_argument("--batch", type=positive, nargs="+", help="batch sizes (default 1 8; quick 1)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="model level: only these models (resnet18, mobilenet_v2, efficientnet), or models "
                        "a user brings: pytorchcv:<module>.<function>, e.g. "
                        "pytorchcv:mobilenetv2.mobilenetv2_w1 (results: fusion_model_user.*)")
    p.add_argument("--shapes", nargs="+", metavar="NAME",
                   help="op level: only these blocks (r18.layer1, mbv2.dw, b0.expand, ...)")
    p.add_argument("--gpu-mode", choices=("build", "run", "all"), default="all",
                   help="gpu level: build the TVM CUDA modules here (no GPU needed), run them on the GPU "
                        "machine (TVM runtime only), or both (default)")


def run(args: argparse.Namespace) -> int:
    import os

    from . import common
    from . import harness as H

    if args.tune and not args.db:
        print("dcgraph bench: error: --tune TRIALS needs --db DIR (where the records go)", file=sys.stderr)
        return 2
    if args.db and not args.tune and not os.path.isdir(args.db):
        print(f"dcgraph bench: error: --db {args.db}: no such directory (dcgraph tune writes one)",
              file=sys.stderr)
        return 2
    if args.shapes:
        from .shapes import SHAPES

        known = [s.name for s in SHAPES]
        unknown = [s for s in args.shapes if s not in known]
        if unknown:
            print(f"dcgraph bench: error: unknown block {unknown[0]!r}; the op level's blocks: "
                  f"{', '.join(known)}", file=sys.stderr)
            return 2

    if args.models:
        from .model_level import model_spec

        try:
            for name in args.models:
                model_spec(name)
        except ValueError as e:
            print(f"dcgraph bench: error: {e}", file=sys.stderr)
            return 2

    out = common.use_results_dir(args.out)
    cmd = " ".join(["dcgraph bench", args.level, *(["--quick"] if args.quick else []),
                    *([f"--db {args.db}"] if args.db else []),
                    *([f"--tune {args.tune}"] if args.tune else []),
                    *([f"--threads {args.threads}"] if args.threads != 2 else []),
                    *([f"--repeats {args.repeats}"] if args.repeats else []),
                    *(["--batch", *map(str, args.batch)] if args.batch else []),
                    *(["--shapes", *args.shapes] if args.shapes else []),
                    *(["--models", *args.models] if args.models else [])])
    levels = ["op", "model", "train", "gpu"] if args.level == "all" else [args.level]
    t0 = time.perf_counter()
    written, failed = [], 0
    for level in levels:
        print(f"== {level} level ==", flush=True)
        if level == "op":
            from . import op_level

            data = op_level.run(args.quick, args.threads, args.repeats, args.db, args.batch, args.shapes,
                                command=cmd, tune_trials=args.tune)
            failed += sum(r.get("status") == H.FAILED for c in data["cases"] for r in c["rows"].values())
        elif level == "model":
            from . import model_level

            data = model_level.run(args.quick, args.threads, args.repeats, args.db, batches=args.batch,
                                   command=cmd, tune_trials=args.tune, models=args.models)
            failed += sum(r.get("status") == H.FAILED for c in data["cases"] for r in c["rows"].values())
        elif level == "arm":
            from dcgraph.backends.tvm.errors import EmulationUnavailable

            from . import arm_level

            try:
                data = arm_level.run(args.quick, shapes=args.shapes, models=args.models, command=cmd,
                                     tune_db=args.db if args.tune else None)
            except EmulationUnavailable as e:
                print(f"dcgraph bench: error: ARM emulation unavailable: {e}", file=sys.stderr)
                return 2
            failed += sum(r.get("status") == H.FAILED for c in data["cases"] for r in c["rows"].values())
        elif level == "train":
            from . import train_level

            data = train_level.run(args.quick, args.threads, batch=(args.batch or [None])[0], command=cmd)
            failed += sum(r.get("status") == H.FAILED for r in data["rows"].values())
            failed += not data["agreement"].get("ok")
        else:
            from . import gpu_level

            if args.level == "all" and not gpu_level.gpu_present():
                print("no CUDA GPU here: gpu level skipped (build here with `dcgraph bench gpu --gpu-mode "
                      "build`, run on a GPU machine with benchmarks/gpu_run.sh)")
                continue
            data = gpu_level.main_mode(args.gpu_mode, quick=args.quick, repeats=args.repeats, command=cmd)
            if data is None:
                continue
            failed += sum(r.get("status") == H.FAILED for c in data.get("cases", [])
                          for r in c["rows"].values())
        print(data["markdown"])
        written += data.get("files", [])
        print(flush=True)
    print(f"dcgraph bench: {time.perf_counter() - t0:.0f} s; wrote " + ", ".join(
        str(out / f) for f in written))
    if failed:
        print(f"dcgraph bench: {failed} row(s) FAILED their check against the reference (see above)",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m dcgraph.bench", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    if argv is None:  # the command line: torch's OpenMP threads passive (harness.OPENMP_WAIT)
        from .harness import rerun_with_passive_openmp

        rerun_with_passive_openmp("dcgraph.bench")
    return run(args)
