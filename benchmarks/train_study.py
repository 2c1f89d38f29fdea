"""A fair recipe study on the deep plain stack: each norm at its own learning rate, two inits.

The question (issue: training at full speed and depth): on the 12-block plain stack
(:mod:`dcgraph.train`, digits), does Deep Control at batch 1 and 4 reach BatchNorm at batch 32
once every norm gets its own learning rate and a fair initialisation?

- recipes: ``he`` (He init), ``msr`` (channel-wise zero-mean filters with unit norm per
  output channel, and each filter's gradient mean subtracted at every step: Mean Shift
  Rejection, arXiv 1911.13173; :mod:`dcgraph.mean_shift`) and ``msr_he`` (the same with He's
  expected filter norm sqrt(2): a relu halves the second moment per layer, which nothing in a
  Deep Control or unnormalised stack restores);
- norms: none, batchnorm, deepcontrol; batch sizes 1, 4, 32;
- learning rate: a 4-point log grid per batch size, chosen per (recipe, norm, batch) on a
  stratified validation split carved from the training split (20%, fixed seed), with seed 0;
  then two more seeds at the chosen rate. Test accuracy (read once, at the end of each run) is
  reported for the three seeds at the chosen rate only.

    python benchmarks/train_study.py [--epochs 12] [--workers 2] [--quick]

Writes ``results/train_study.{json,md,png}``. Reproducible (fixed seeds, CPU, one thread per run).
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

RESULTS = use_results_dir(Path(__file__).resolve().parent / "results")

RECIPES = {"he": ("he", False), "msr": ("zero_mean", True), "msr_he": ("zero_mean_he", True)}
NORMS = ("none", "batchnorm", "deepcontrol")
BATCHES = (1, 4, 32)
LRS = {1: (0.001, 0.003, 0.01, 0.03), 4: (0.003, 0.01, 0.03, 0.1), 32: (0.01, 0.03, 0.1, 0.3)}
VAL_FRACTION = 0.2
SEEDS = 3


def _run(job: tuple) -> dict:
    import torch

    from dcgraph.train import TrainConfig, load_data, train

    torch.set_num_threads(1)
    recipe, norm, batch, lr, seed, epochs = job
    init, msr = RECIPES[recipe]
    cfg = TrainConfig(norm, batch, "deep", epochs, seed, lr, init=init, msr=msr, val_fraction=VAL_FRACTION)
    out = json.loads(train(cfg, data=load_data()).to_json())
    out["recipe"] = recipe
    return out


def _pool(jobs: list[tuple], workers: int, desc: str) -> list[dict]:
    jobs = sorted(jobs, key=lambda j: j[2])  # batch 1 first: the pool stays busy
    runs = []
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_run, j) for j in jobs]
        for f in tqdm(as_completed(futures), total=len(futures), desc=desc):
            runs.append(f.result())
    return runs


def _key(r: dict) -> tuple:
    return r["recipe"], r["config"]["norm"], r["config"]["batch_size"]


def _choose(sweep: list[dict]) -> dict[tuple, float]:
    """The learning rate with the best final validation accuracy per (recipe, norm, batch);
    ties go to the smaller rate."""
    best: dict[tuple, tuple[float, float]] = {}
    for r in sweep:
        k, lr, acc = _key(r), r["config"]["lr"], r["val_accuracy"]
        if k not in best or acc > best[k][1] or (acc == best[k][1] and lr < best[k][0]):
            best[k] = (lr, acc)
    return {k: lr for k, (lr, _) in best.items()}


def _table(sweep: list[dict], final: list[dict], chosen: dict[tuple, float]) -> str:
    lines = ["| recipe | batch | norm | lr (chosen on val) | val accuracy by lr (seed 0) | "
             "test accuracy over the seeds (mean, min-max) | epochs to 90% val |",
             "|---|---|---|---|---|---|---|"]
    for recipe, batch, norm in itertools.product(RECIPES, BATCHES, NORMS):
        k = (recipe, norm, batch)
        if k not in chosen:
            continue
        by_lr = sorted((r["config"]["lr"], r["val_accuracy"]) for r in sweep if _key(r) == k)
        rs = [r for r in final if _key(r) == k and r["config"]["lr"] == chosen[k]]
        accs = [r["test_accuracy"] for r in rs]
        reached = [r["epochs_to_target"] for r in rs if r["epochs_to_target"] is not None]
        e90 = (f"{statistics.mean(reached):.1f} ({len(reached)}/{len(rs)})" if reached
               else f"never (0/{len(rs)})")
        lines.append(f"| {recipe} | {batch} | {norm} | {chosen[k]:g} | "
                     + ", ".join(f"{lr:g}: {a:.3f}" for lr, a in by_lr)
                     + f" | **{statistics.mean(accs):.3f}** ({min(accs):.3f}-{max(accs):.3f}) | {e90} |")
    return "\n".join(lines)


def _plot(final: list[dict], chosen: dict[tuple, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "tab:gray", "batchnorm": "tab:blue", "deepcontrol": "tab:red"}
    fig, axes = plt.subplots(len(RECIPES), len(BATCHES), figsize=(14, 10), sharey=True)
    for (i, recipe), (j, batch) in itertools.product(enumerate(RECIPES), enumerate(BATCHES)):
        ax = axes[i][j]
        for norm in NORMS:
            k = (recipe, norm, batch)
            rs = [r for r in final if _key(r) == k and r["config"]["lr"] == chosen.get(k)]
            for n, r in enumerate(rs):
                steps, acc = zip(*r["curve"], strict=True)
                ax.plot(steps, acc, color=colors[norm], alpha=0.7, lw=1,
                        label=f"{norm} (lr {chosen[k]:g})" if n == 0 else None)
        ax.set_title(f"{recipe}, batch {batch}", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_xlabel("training steps")
        if j == 0:
            ax.set_ylabel("validation accuracy")
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("Deep plain stack (12 blocks), digits: validation accuracy at each norm's chosen lr, "
                 "3 seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 epoch, batch 32, 2 learning rates, 1 seed")
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    batches = (32,) if args.quick else BATCHES
    seeds = 1 if args.quick else SEEDS
    sweep_jobs = [(rc, n, b, lr, 0, epochs) for rc, n, b in itertools.product(RECIPES, NORMS, batches)
                  for lr in (LRS[b][1:3] if args.quick else LRS[b])]
    sweep = _pool(sweep_jobs, args.workers, "lr sweep (seed 0)")
    chosen = _choose(sweep)
    more = [(rc, n, b, chosen[(rc, n, b)], s, epochs) for (rc, n, b) in chosen for s in range(1, seeds)]
    final = [r for r in sweep if r["config"]["lr"] == chosen[_key(r)]] + _pool(more, args.workers, "seeds")
    info = machine_info()
    total = sum(r["seconds"] for r in sweep) + sum(r["seconds"] for r in final if r["config"]["seed"] > 0)
    md = (f"Deep plain stack (12 conv blocks of 16 channels at 8x8), digits: "
          f"1,149 train / 288 validation (stratified from the 1,437-image training split) / 360 test, "
          f"{epochs} epochs, SGD momentum 0.9. Learning rate chosen per row on the validation split "
          f"(seed 0), then seeds 0-{seeds - 1} at that rate; test accuracy read once at the end of each "
          f"run. {info['cpu']}, torch {info['torch']}, {info['date']}; {total:.0f} s of training on "
          f"{args.workers} workers. Command: `python benchmarks/train_study.py"
          f"{' --quick' if args.quick else ''}`.\n\n" + _table(sweep, final, chosen))
    stem = "train_study_quick" if args.quick else "train_study"
    paths = write_results(stem, {"machine": info, "epochs": epochs,
                                 "lrs": {str(k): v for k, v in LRS.items()},
                                 "chosen": [[*k, v] for k, v in chosen.items()], "sweep": sweep,
                                 "final": final}, md)
    _plot(final, chosen, RESULTS / f"{stem}.png")
    print(md)
    print(f"\nwrote {paths[0]}, {paths[1]} and {RESULTS / (stem + '.png')}")


if __name__ == "__main__":
    main()
