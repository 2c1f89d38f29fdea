"""How fast does the fused Deep Control kernel get with tuning? Speed after 0, 16, 64, 256 trials.

For ResNet-18 conv shapes at batch 1 (conv 3x3 + Deep Control + relu, dcgraph's hoisted plan:
``dc_shift`` computes the per-sample shift from the input, ``dc_conv`` is the convolution with
the scale/shift/relu epilogue), ``dcgraph.backends.tvm.tuning`` spends the trials on ``dc_conv``
("the fused kernel"); ``dc_shift`` keeps its default schedule. One database per layer grows
across the steps (``tune`` resumes: the step to 64 trials spends 48 more), so "after N trials"
is what a user gets from ``dcgraph tune --trials N``; the schedule after N is the best of the
first N measured candidates and the default schedule (0 trials = the default schedule).

Rows, measured at the end in one run, interleaved in a shuffled order
(:func:`dcgraph.bench.common.time_interleaved`, ``shuffle=True``), each checked against
:func:`dcgraph.reference.conv_deep_control` first:

- ``torch conv``: PyTorch eager conv alone (oneDNN), the target's yardstick;
- ``fused @N``: the ``dc_conv`` kernel alone after N trials (ratio to torch conv);
- ``block @N``: the whole fused op (``dc_shift`` + ``dc_conv``, a compiled Relax module).

Target (autotuning issue): fused kernel within 1.2x of PyTorch's conv alone at 64 trials on
the larger layers.

    python benchmarks/tune_curve.py [--quick] [--layers layer1 layer3] [--trials 0 16 64]
                                    [--max-trials N] [--repeats N] [--threads T] [--db DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# TVM's worker threads spin after each call, stealing the cores from the next (torch) call
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import torch
import torch.nn.functional as F
import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from dcgraph import reference as R
from dcgraph.backends.tvm import compiler, modules, targets
from dcgraph.backends.tvm.pipeline import fuse
from dcgraph.backends.tvm.schedules import SCHEDULED, schedule_func_cpu, vector_lanes
from dcgraph.backends.tvm.tuning import database_dir, extract_tasks, tune
from dcgraph.bench.common import RESNET18, machine_info, time_interleaved, use_results_dir, write_results

#: this checkout's committed results
RESULTS = use_results_dir(Path(__file__).resolve().parent / "results")

KERNEL = "dc_conv"
# the curve of the NCHW kernels (the hoisted pair) this study was made for; the blocked layout's
# tuning space is issue 16's
LAYOUT = "nchw"
DEFAULT_LAYERS = ["layer1", "layer2", "layer3"]
LARGER = {"layer1", "layer2", "layer3", "layer4"}  # 3x3, stride 1: the "larger layers" of the target
TARGET_RATIO = 1.2


def block_module(x_shape, w, a, g, b, stride: int, pad: int) -> tvm.IRModule:
    """The layer's conv + Deep Control + relu, dcgraph's fused kernels, weights as constants."""
    return modules.block_module("fused", x_shape, tuple(w.shape), act="relu", stride=stride, padding=pad,
                                plan="hoisted",
                                consts={"weight": w.numpy(), "a": a.numpy(), "g": g.numpy(), "b": b.numpy()})


def ordered_records(directory: Path) -> list[ms.database.TuningRecord]:
    """The database's records in the order they were measured (the file's order)."""
    workloads = [ms.database.Workload.from_json(json.loads(line))
                 for line in (directory / "database_workload.json").read_text().splitlines() if line.strip()]
    out = []
    for line in (directory / "database_tuning_record.json").read_text().splitlines():
        if line.strip():
            idx, rec = json.loads(line)
            out.append(ms.database.TuningRecord.from_json(rec, workloads[idx]))
    return out


def _secs(rec: ms.database.TuningRecord) -> float:
    vals = [float(v.value) for v in rec.run_secs]
    return sum(vals) / len(vals)


def _is_search(rec) -> bool:
    return any(i.kind.name.startswith("Sample") for i in rec.trace.insts)


def best_after(records: list, workload_mod: tvm.IRModule, n: int) -> ms.database.TuningRecord | None:
    """The best valid record among the default schedule's and the first ``n`` search trials."""
    mine = [r for r in records if tvm_ffi.structural_equal(r.workload.mod, workload_mod)]
    search = [r for r in mine if _is_search(r)][:n]
    default = [r for r in mine if not _is_search(r)]
    valid = [r for r in default + search if _secs(r) < 1e9]
    return min(valid, key=_secs) if valid else None


def kernel_fn(task_mod: tvm.IRModule, rec, target: tvm.target.Target):
    """The dc_conv PrimFunc built with ``rec`` applied (None: the default schedule), callable on arrays."""
    if rec is None:
        func = schedule_func_cpu(task_mod["main"], vector_lanes(target))
        mod = tvm.IRModule({"main": func.without_attr(SCHEDULED) if func is not None else task_mod["main"]})
    else:
        sch = tvm.s_tir.Schedule(task_mod)
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        mod = sch.mod
    return tvm.tirx.build(mod, target=target)["main"]


def bench_layer(name, cin, cout, size, k, stride, steps, repeats, target, db, cost_model, progress):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, size, size, generator=gen)
    w = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
    a, g, b = torch.rand(cout, generator=gen), 0.5 + torch.rand(cout, generator=gen), torch.randn(cout)
    pad = k // 2
    mod = block_module(tuple(x.shape), w, a, g, b, stride, pad)
    layer_db = Path(db) / name
    # seconds each step took (kept with the database: a rerun on it measures, it does not re-tune)
    seconds_file = layer_db / "tune_curve_seconds.json"
    tune_seconds = {int(k): v for k, v in json.loads(seconds_file.read_text()).items()} \
        if seconds_file.is_file() else {}
    done, cost_note = 0, "-"
    for n in sorted(s for s in steps if s > 0):
        t0 = time.monotonic()
        report = tune(mod, target, trials=n, db=layer_db, kernels=[KERNEL], cost_model=cost_model,
                      progress=progress, min_trials=1, layout=LAYOUT)
        if report.trials_run:
            tune_seconds[n] = time.monotonic() - t0
            seconds_file.write_text(json.dumps(tune_seconds))
        done = report.tasks[0].trials
        cost_note = report.cost_model

    # the dc_conv workload and its schedules after each step
    (task,) = [t for t in extract_tasks(fuse(mod, target, LAYOUT), target) if t.name == KERNEL]
    records = ordered_records(database_dir(layer_db, target)) if done else []
    chosen = {n: (best_after(records, task.mod, n) if n > 0 else None) for n in steps}
    # MetaSchedule's own measurements (its runner): the default schedule, the best search candidate
    mine = [r for r in records if tvm_ffi.structural_equal(r.workload.mod, task.mod)]
    search = [r for r in mine if _is_search(r)]
    measured = {"default_ms": next((_secs(r) * 1e3 for r in mine if not _is_search(r)), None)}
    for n in steps:
        ok = [_secs(r) for r in search[:n] if _secs(r) < 1e9]
        measured[f"search_best_{n}_ms"] = min(ok) * 1e3 if ok else None

    want = R.conv_deep_control(x.double(), w.double(), None, a.double(), g.double(), b.double(),
                               stride, pad, act="relu").numpy()
    dev = tvm.cpu()
    tx = tvm.runtime.tensor(x.numpy(), dev)
    macs = cout * cin * k * k * (size // stride) ** 2
    inner = max(1, min(10, int(20e6 / macs)))

    def block(call):
        def run():
            for _ in range(inner):
                call()
        return run

    fns, failed = {}, {}
    with torch.no_grad():
        fns["torch_conv"] = block(lambda: F.conv2d(x, w, None, stride, pad))
    for n in steps:
        try:
            memdb = ms.database.MemoryDatabase()
            if chosen[n] is not None:
                memdb.commit_tuning_record(ms.database.TuningRecord(
                    chosen[n].trace, memdb.commit_workload(task.mod), chosen[n].run_secs,
                    chosen[n].target, chosen[n].args_info))
            compiled = compiler.compile(mod, target, database=memdb if chosen[n] is not None else None,
                                        layout=LAYOUT)
            got = compiled(x.numpy())
            err = float(np.abs(got - want).max() / np.abs(want).max())
            if not err < 1e-4:
                failed[f"block_{n}"] = f"wrong result: relative error {err:.1e}"
                continue
            vm = compiled.vm()["main"]
            fns[f"block_{n}"] = block(lambda vm=vm: vm(tx))
            kern = kernel_fn(task.mod, chosen[n], target)
            args_info = [i.as_json() for i in ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])]
            shapes = [tuple(i[2]) for i in args_info]
            shift = _shift(x, w, a, g, b, stride, pad)
            inputs = [x.numpy(), w.numpy(), g.numpy(), shift]  # conv_epilogue(x, w, scale=g, shift)
            assert [tuple(i.shape) for i in inputs] == shapes[:-1], (shapes, [i.shape for i in inputs])
            ts = [tvm.runtime.tensor(np.ascontiguousarray(i, dtype="float32"), dev) for i in inputs]
            ts.append(tvm.runtime.empty(shapes[-1], "float32", dev))
            kern(*ts)
            kerr = float(np.abs(ts[-1].numpy() - want).max() / np.abs(want).max())
            if not kerr < 1e-4:
                failed[f"fused_{n}"] = f"wrong result: relative error {kerr:.1e}"
                continue
            fns[f"fused_{n}"] = block(lambda kern=kern, ts=ts: kern(*ts))
        except Exception as e:  # a row that cannot build is reported, the others still run
            failed[f"fused_{n}"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:120]}"
    with torch.no_grad():
        # Shuffled: in a fixed order the two or three TVM rows after torch's conv ran up to 2x
        # slow (identical kernels at different positions: 4.2 vs 2.0 ms medians); torch's OpenMP
        # threads still spinning is the likely cause (OMP_WAIT_POLICY=PASSIVE made torch's conv
        # itself 15-40% slower here, so it is not used). Shuffling spreads that over every row.
        t = time_interleaved(fns, repeats, shuffle=True)
    row = {"layer": name, "shape": f"{cin}->{cout} {k}x{k}/{stride} @{size}", "trials_in_db": done,
           "tune_seconds": tune_seconds, "cost_model": cost_note, "failed": failed,
           "chosen": {n: ("default" if chosen[n] is None or not _is_search(chosen[n]) else "tuned")
                      for n in steps}, **measured}
    for key, d in t.items():
        for m, v in d.items():
            row[f"{key}_{m}"] = v / inner
    for n in steps:
        if f"fused_{n}_median_ms" in row:
            row[f"fused_{n}_vs_torch_conv"] = row[f"fused_{n}_median_ms"] / row["torch_conv_median_ms"]
            row[f"fused_{n}_vs_torch_conv_min"] = row[f"fused_{n}_min_ms"] / row["torch_conv_min_ms"]
        if f"block_{n}_median_ms" in row:
            row[f"block_{n}_vs_torch_conv"] = row[f"block_{n}_median_ms"] / row["torch_conv_median_ms"]
    return row


def _shift(x, w, a, g, b, stride, pad) -> np.ndarray:
    """The per-sample shift o[n, c] the dc_conv kernel takes: b - g * a * mean(conv(x, w))."""
    y = F.conv2d(x.double(), w.double(), None, stride, pad)
    m = y.mean(dim=(2, 3))
    return (b.double() - g.double() * a.double() * m).float().numpy()


def plot(rows, steps, path: Path) -> None:
    """Left: the fused kernel compile uses after N trials / PyTorch's conv (interleaved timings).
    Right: MetaSchedule's best search candidate / the default schedule (its runner's timings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    values = []
    for r in rows:
        label = f"{r['layer']} ({r['shape']})"
        pts = [(n, r[f"fused_{n}_vs_torch_conv"]) for n in steps if f"fused_{n}_vs_torch_conv" in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            values += [p[1] for p in pts]
        if r.get("default_ms"):
            pts2 = [(n, r[f"search_best_{n}_ms"] / r["default_ms"]) for n in steps
                    if n > 0 and r.get(f"search_best_{n}_ms")]
            if pts2:
                ax2.plot([p[0] for p in pts2], [p[1] for p in pts2], marker="o", label=label)
                values += [p[1] for p in pts2]
    ax.axhline(TARGET_RATIO, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET_RATIO}x")
    ax2.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="default schedule")
    lo, hi = min([*values, 0.9]) / 1.1, max([*values, 1.3]) * 1.1
    for a in (ax, ax2):
        a.axhline(1.0, color="black", linewidth=0.8)
        a.set_xscale("symlog", linthresh=16)
        a.set_xticks(steps)
        a.set_xticklabels([str(s) for s in steps])
        a.set_yscale("log")
        a.set_ylim(lo, hi)
        a.yaxis.set_major_formatter(ScalarFormatter())
        a.yaxis.set_minor_formatter(NullFormatter())
        a.set_yticks([t for t in (0.5, 0.7, 0.8, 0.9, 1, 1.2, 1.5, 2, 3, 4, 6, 8) if lo <= t <= hi])
        a.set_xlabel("MetaSchedule trials on the fused kernel")
        a.legend(fontsize=7)
    ax.set_ylabel("fused kernel / PyTorch conv alone")
    ax.set_title("What compile uses after N trials (0: default schedule)", fontsize=10)
    ax2.set_ylabel("best search candidate / default schedule")
    ax2.set_title("MetaSchedule's search alone (its own timings)", fontsize=10)
    fig.suptitle("Fused conv + Deep Control + relu (dc_conv), x86, batch 1")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke: one small layer, 0 and 4 trials")
    parser.add_argument("--layers", nargs="+", help=f"ResNet-18 layers (default {' '.join(DEFAULT_LAYERS)})")
    parser.add_argument("--trials", type=int, nargs="+", help="trial counts (default 0 16 64 256)")
    parser.add_argument("--max-trials", type=int, help="drop trial counts above this")
    parser.add_argument("--repeats", type=int, help="timed runs per row (default 40, quick 15)")
    parser.add_argument("--threads", type=int, default=2, help="torch and TVM threads (default 2)")
    parser.add_argument("--db", help="keep the tuning databases here (default: a temporary directory); "
                                     "an existing one is resumed")
    parser.add_argument("--cost-model", default="auto", choices=["auto", "xgb", "random"])
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--name", help="results file stem (default tune_curve, quick: tune_curve_quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    target = targets.resolve({"kind": "llvm", "mcpu": targets.host_cpu(), "num-cores": args.threads})
    layers = args.layers or (["layer4"] if args.quick else DEFAULT_LAYERS)
    steps = sorted(set(args.trials or ([0, 4] if args.quick else [0, 16, 64, 256])))
    if args.max_trials is not None:
        steps = [s for s in steps if s <= args.max_trials]
    repeats = args.repeats or (15 if args.quick else 40)
    known = {s[0]: s for s in RESNET18}
    unknown = [name for name in layers if name not in known]
    if unknown:
        parser.error(f"unknown layers {unknown}; choose from {', '.join(known)}")
    db = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="dcgraph-tune-curve-"))
    t0 = time.monotonic()
    rows = []
    try:
        for name in layers:
            print(f"{name}: tuning {KERNEL} to {max(steps)} trials ...", flush=True)
            rows.append(bench_layer(*known[name], steps, repeats, target, db, args.cost_model,
                                    not args.no_progress))
    finally:
        if not args.db:
            shutil.rmtree(db, ignore_errors=True)
    wall = time.monotonic() - t0
    info = machine_info()
    info["tvm"] = tvm.__version__
    info["tvm_target"] = targets.describe(target)
    cost = next((r["cost_model"] for r in rows if r["cost_model"] != "-"), "-")

    def cell(r: dict, key: str) -> str:
        if key in r["failed"]:
            return "FAILED"
        if f"{key}_median_ms" not in r:
            return "-"
        text = f"{r[key + '_median_ms']:.3f}"
        if f"{key}_vs_torch_conv" in r:
            text += f" ({r[key + '_vs_torch_conv']:.2f}x)"
        n = int(key.rsplit("_", 1)[1])
        if key.startswith("fused_") and n > 0 and r["chosen"].get(n, r["chosen"].get(str(n))) == "default":
            text += " d"
        return text

    cmd = "python benchmarks/tune_curve.py" + (" --quick" if args.quick else "") + \
        (f" --layers {' '.join(layers)}" if args.layers else "") + \
        (f" --trials {' '.join(map(str, steps))}" if args.trials or args.max_trials is not None else "") + \
        (f" --name {args.name}" if args.name else "") + (f" --db {args.db}" if args.db else "")
    lines = [
        f"Forward, fp32, batch 1, {args.threads} threads, {info['cpu']}, TVM {info['tvm']} "
        f"({info['tvm_target']}), torch {info['torch']}, {info['date']}. Median ms of {repeats} "
        f"interleaved runs in shuffled order; (ratio to PyTorch's conv alone). Trials spent on the "
        f"fused kernel (dc_conv) by `dcgraph.backends.tvm.tuning`, cost model {cost}; 0 = dcgraph's "
        f"default schedule. "
        f"`{cmd}`: {wall / 60:.1f} min this run; the last column is the tuning time of each step "
        f"(kept with the database, so a rerun on an existing --db measures without re-tuning).",
        "",
        "| layer | conv | torch conv | " + " | ".join(f"fused @{n}" for n in steps) + " | "
        + " | ".join(f"block @{n}" for n in steps) + " | tuning s per step (to 16, 64, 256) |",
        "|---|---|---|" + "---|" * (2 * len(steps)) + "---|",
    ]
    for r in rows:
        secs = ", ".join(f"{n}: {s:.0f}" for n, s in r["tune_seconds"].items()) or "-"
        lines.append(f"| {r['layer']} | {r['shape']} | {r['torch_conv_median_ms']:.3f} | "
                     + " | ".join(cell(r, f"fused_{n}") for n in steps) + " | "
                     + " | ".join(cell(r, f"block_{n}") for n in steps) + f" | {secs} |")
    lines.append("")
    lines.append("`d`: the default schedule is still the fastest measured, so that is what compile uses "
                 "after N trials (tune stores it as a record; the search has not beaten it yet).")
    lines.append("")
    for r in rows:
        best = ", ".join(f"@{n} {r[f'search_best_{n}_ms']:.3f}" for n in steps
                         if n > 0 and r.get(f"search_best_{n}_ms") is not None)
        if r.get("default_ms") is not None and best:
            lines.append(f"- {r['layer']}, MetaSchedule's own timings (its runner, ms): default schedule "
                         f"{r['default_ms']:.3f}; best search candidate {best}")
    at = 64 if 64 in steps else max(steps)
    for r in rows:
        key = f"fused_{at}_vs_torch_conv"
        if key in r and r["layer"] in LARGER:
            med, low = r[key] <= TARGET_RATIO, r[key + "_min"] <= TARGET_RATIO
            verdict = "meets" if med and low else "meets on the median only" if med else \
                "meets on the minimum only" if low else "misses"
            lines.append(f"- {r['layer']}: fused kernel at {at} trials {r[key]:.2f}x PyTorch's conv "
                         f"(min-based {r[key + '_min']:.2f}x): {verdict} the {TARGET_RATIO}x target")
    for r in rows:
        for kind, why in r["failed"].items():
            lines.append(f"- FAILED {kind} on {r['layer']}: {why}")
    md = "\n".join(lines)
    stem = args.name or ("tune_curve_quick" if args.quick else "tune_curve")
    paths = write_results(stem, {"machine": info, "steps": steps, "repeats": repeats, "command": cmd,
                                 "wall_seconds": wall, "rows": rows}, md)
    png = paths[0].with_suffix(".png")
    plot(rows, steps, png)
    print(md)
    print(f"\nwrote {paths[0]}, {paths[1]} and {png}")


if __name__ == "__main__":
    main()
