"""Does Deep Control train as well as batch norm, at every batch size? The paper's claims, measured.

Grid: normalisation (none, batchnorm, groupnorm, deepcontrol, deepcontrol_frozen_a) x batch
size (1, 4, 32) x depth (shallow, deep plain 12-layer stack) x seeds, on scikit-learn's
digits (see :mod:`dcgraph.train`). Runs in parallel worker processes, one torch thread each.
Writes ``results/train_grid.{json,md,png}``: mean and spread (min-max over seeds) of the
final test accuracy, epochs to 90% test accuracy, activation bytes autograd saves per step,
and test accuracy against training steps.

    python benchmarks/train_grid.py [--epochs 6] [--seeds 3] [--workers 2] [--quick]

Reproducible: the same arguments give the same numbers (fixed seeds, CPU, deterministic ops).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from dcgraph.bench.common import machine_info, use_results_dir, write_results

#: this checkout's committed results
RESULTS = use_results_dir(Path(__file__).resolve().parent / "results")

NORMS = ("none", "batchnorm", "groupnorm", "deepcontrol", "deepcontrol_frozen_a")
BATCHES = (1, 4, 32)
DEPTHS = ("shallow", "deep")


def _run(job: tuple) -> dict:
    import torch

    from dcgraph.train import TrainConfig, load_data, train

    torch.set_num_threads(1)
    norm, batch, depth, seed, epochs = job
    result = train(TrainConfig(norm, batch, depth, epochs, seed), data=load_data())
    return json.loads(result.to_json())


def _table(runs: list[dict], seeds: int) -> str:
    lines = ["| depth | batch | norm | test accuracy (mean, min-max) | epochs to 90% | "
             "saved KiB / step | s / epoch |", "|---|---|---|---|---|---|---|"]
    for depth, batch, norm in itertools.product(DEPTHS, BATCHES, NORMS):
        rs = [r for r in runs if r["config"]["norm"] == norm and r["config"]["batch_size"] == batch
              and r["config"]["depth"] == depth]
        if not rs:
            continue
        accs = [r["test_accuracy"] for r in rs]
        reached = [r["epochs_to_target"] for r in rs if r["epochs_to_target"] is not None]
        e90 = (f"{statistics.mean(reached):.2f} ({len(reached)}/{len(rs)} runs)" if reached
               else f"never (0/{len(rs)})")
        per_epoch = statistics.mean(r["seconds"] / r["config"]["epochs"] for r in rs)
        lines.append(f"| {depth} | {batch} | {norm} | {statistics.mean(accs):.3f} "
                     f"({min(accs):.3f}-{max(accs):.3f}) | {e90} | "
                     f"{rs[0]['saved_bytes_per_step'] / 1024:.1f} | {per_epoch:.1f} |")
    return "\n".join(lines)


def _plot(runs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(DEPTHS), len(BATCHES), figsize=(14, 7), sharey=True)
    colors = dict(zip(NORMS, ("tab:gray", "tab:blue", "tab:green", "tab:red", "tab:orange"),
                      strict=True))
    for (i, depth), (j, batch) in itertools.product(enumerate(DEPTHS), enumerate(BATCHES)):
        ax = axes[i][j]
        for norm in NORMS:
            rs = [r for r in runs if r["config"]["norm"] == norm and r["config"]["batch_size"] == batch
                  and r["config"]["depth"] == depth]
            for k, r in enumerate(rs):
                steps, acc = zip(*r["curve"], strict=True)
                ax.plot(steps, acc, color=colors[norm], alpha=0.7, lw=1,
                        label=norm if k == 0 else None)
        ax.set_title(f"{depth}, batch {batch}")
        ax.set_xlabel("training steps")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_ylabel("test accuracy")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Digits: test accuracy against training steps (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, batch 32 only")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the table and plot from results/train_grid.json")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((RESULTS / "train_grid.json").read_text())
        _report(saved["runs"], saved["epochs"], saved["seeds"], saved.get("workers", 2), "train_grid")
        return
    epochs, seeds = (1, 1) if args.quick else (args.epochs, args.seeds)
    batches = (32,) if args.quick else BATCHES
    jobs = [(n, b, d, s, epochs) for d, b, n, s in
            itertools.product(DEPTHS, batches, NORMS, range(seeds))]
    jobs.sort(key=lambda j: j[1])  # the slow batch-1 runs first, so the pool stays busy
    runs = []
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(_run, j) for j in jobs]
        for f in tqdm(as_completed(futures), total=len(futures), desc="training runs"):
            runs.append(f.result())
    runs.sort(key=lambda r: (r["config"]["depth"], r["config"]["batch_size"], r["config"]["norm"],
                             r["config"]["seed"]))
    _report(runs, epochs, seeds, args.workers, "train_grid_quick" if args.quick else "train_grid")


def _report(runs: list[dict], epochs: int, seeds: int, workers: int, stem: str) -> None:
    info = machine_info()
    header = (f"Digits (1,437 train / 360 test), {epochs} epochs, {seeds} seeds, SGD momentum 0.9, "
              f"lr by batch size (1: 0.005, 4: 0.02, 32: 0.05), He init; {info['cpu']}, "
              f"torch {info['torch']}, {info['date']}. Total {sum(r['seconds'] for r in runs):.0f} s "
              f"of training on {workers} workers (one torch thread each).")
    md = header + "\n\n" + _table(runs, seeds)
    paths = write_results(stem, {"machine": info, "epochs": epochs, "seeds": seeds,
                                 "workers": workers, "runs": runs}, md)
    _plot(runs, RESULTS / f"{stem}.png")
    print(md)
    print(f"\nwrote {paths[0]}, {paths[1]} and {RESULTS / (stem + '.png')}")


if __name__ == "__main__":
    main()
