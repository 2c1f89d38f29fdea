"""``dcgraph train``: a small CNN on the digits data with a chosen normalisation."""

from __future__ import annotations

import argparse
import os
import sys

from dcgraph.argtypes import output_file, positive, positive_float, validation_fraction


def add_parser(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser(
        "train", help="train a small CNN on the digits data with a chosen normalisation",
        description="Train a small CNN on scikit-learn's handwritten digits (no download; 80/20 "
                    "stratified split, fixed seeds) with no norm, BatchNorm, GroupNorm or Deep "
                    "Control, and report test accuracy, epochs to 90% and the activation bytes "
                    "autograd saves per step. benchmarks/train_grid.py runs the whole grid.")
    tr.add_argument("--norm", choices=["none", "batchnorm", "groupnorm", "deepcontrol",
                                       "deepcontrol_frozen_a"], default="deepcontrol")
    tr.add_argument("--batch-size", type=positive, default=32)
    tr.add_argument("--depth", choices=["shallow", "deep"], default="shallow",
                    help="shallow: 3 conv blocks; deep: 12 plain blocks, no residuals")
    tr.add_argument("--epochs", type=positive, default=10)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--lr", type=positive_float, help="default: by batch size (1: 0.005, 4: 0.02, 32: 0.05)")
    tr.add_argument("--init", choices=["he", "zero_mean", "zero_mean_he"], default="he",
                    help="conv weights: He (default), or channel-wise zero-mean with unit norm per "
                         "output channel (Mean Shift Rejection, arXiv 1911.13173), or zero-mean "
                         "with He's expected norm sqrt(2)")
    tr.add_argument("--msr", action="store_true",
                    help="subtract each conv filter's gradient mean before every step (keeps "
                         "zero-mean filters zero-mean; dcgraph.mean_shift.reject_mean_shift)")
    tr.add_argument("--val-fraction", type=validation_fraction, default=0.0, metavar="F",
                    help="carve a validation split (fraction F of the training split) for the "
                         "curve; the test split is read once at the end")
    tr.add_argument("--json", type=output_file(".json"), metavar="PATH",
                    help="write the result (with the accuracy curve)")
    tr.add_argument("--threads", type=positive, default=2)
    tr.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dcgraph.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(args.norm, args.batch_size, args.depth, args.epochs, args.seed, args.lr,
                      init=args.init, msr=args.msr, val_fraction=args.val_fraction)
    result = train(cfg.check(), progress=sys.stderr.isatty())
    target = (f"{result.epochs_to_target} epochs" if result.epochs_to_target is not None
              else "not reached")
    print(f"{args.norm}, batch {args.batch_size}, {args.depth}, seed {args.seed}: test accuracy "
          f"{result.test_accuracy:.4f} after {args.epochs} epochs ({result.seconds:.1f} s); "
          f"90% {target}; {result.saved_bytes_per_step / 1024:.1f} KiB saved per step"
          + (f"; validation accuracy {result.val_accuracy:.4f}" if result.val_accuracy is not None else ""))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(result.to_json())
        os.replace(tmp, args.json)
    return 0
