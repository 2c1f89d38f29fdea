"""Is Deep Control nearly free? conv alone vs conv + DC as plain ops vs the fused op.

Forward (inference) on the conv shapes of ResNet-18 at batch 1 and 8, every row measured in
the same run, interleaved. Each row's fused output is checked against the reference first.
"fused" is what users call (the reduced plan); "hoisted" times the mean-hoisting plan in
eager PyTorch, to show why the op does not run it there.
Target (operator issue): the fused op within 1.10x of conv alone.

    python benchmarks/op_speed.py [--quick] [--repeats N] [--threads T]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dcgraph import functional as DF
from dcgraph import ops
from dcgraph import reference as R
from dcgraph.bench.common import (
    RESNET18,
    geomean,
    machine_info,
    time_interleaved,
    use_results_dir,
    write_results,
)

#: this checkout's committed results
RESULTS = use_results_dir(Path(__file__).resolve().parent / "results")

QUICK = ["layer1", "layer3", "layer4"]


def bench_shape(name, cin, cout, size, k, stride, batch, repeats):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=gen)
    w = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
    a, g, b = torch.rand(cout, generator=gen), 0.5 + torch.rand(cout, generator=gen), torch.randn(cout)
    p = k // 2
    args = (x, w, None, a, g, b, [stride] * 2, [p] * 2, [1, 1], 1, "relu", 0.01)
    with torch.no_grad():
        ref = R.conv_deep_control(x.double(), w.double(), None, a.double(), g.double(), b.double(),
                                  stride, p, act="relu")
        torch.testing.assert_close(ops.conv_deep_control_op(*args), ref.float(), rtol=1e-3, atol=1e-3)
        fns = {
            "conv": lambda: F.conv2d(x, w, None, stride, p),
            "plain": lambda: DF.deep_control(F.conv2d(x, w, None, stride, p), a, g, b, "relu"),
            "fused": lambda: DF.conv_deep_control(x, w, None, a, g, b, stride, p, act="relu"),
            "hoisted": lambda: ops.forward_hoisted(*args),
        }
        torch.testing.assert_close(ops.forward_hoisted(*args), ref.float(), rtol=1e-3, atol=1e-3)
        t = time_interleaved(fns, repeats)
    return {"layer": name, "batch": batch, "shape": f"{cin}->{cout} {k}x{k}/{stride} @{size}", **{
        f"{k}_{m}": v for k, d in t.items() for m, v in d.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three shapes, few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 30)
    shapes = [s for s in RESNET18 if not args.quick or s[0] in QUICK]
    rows = []
    jobs = [(s, n) for n in (1, 8) for s in shapes]
    for shape, batch in tqdm(jobs, desc="op speed", unit="row"):
        rows.append(bench_shape(*shape, batch, repeats))
    for r in rows:
        r["plain_vs_conv"] = r["plain_median_ms"] / r["conv_median_ms"]
        r["fused_vs_conv"] = r["fused_median_ms"] / r["conv_median_ms"]
        r["fused_vs_plain"] = r["fused_median_ms"] / r["plain_median_ms"]
        r["hoisted_vs_conv"] = r["hoisted_median_ms"] / r["conv_median_ms"]
        r["plain_vs_conv_min"] = r["plain_min_ms"] / r["conv_min_ms"]
        r["fused_vs_conv_min"] = r["fused_min_ms"] / r["conv_min_ms"]
    info = machine_info()
    lines = [
        f"Forward, fp32, {info['torch_threads']} threads, {info['cpu']}, torch {info['torch']}, "
        f"{info['date']}; median of {repeats} interleaved runs (IQR in brackets).",
        "",
        "| layer | batch | conv | conv ms | plain DC ms | fused ms | plain / conv | fused / conv "
        "| fused / conv (min) | hoisted plan / conv |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['batch']} | {r['shape']} | {r['conv_median_ms']:.3f} "
            f"({r['conv_iqr_ms']:.3f}) | {r['plain_median_ms']:.3f} | {r['fused_median_ms']:.3f} "
            f"({r['fused_iqr_ms']:.3f}) | {r['plain_vs_conv']:.2f}x | {r['fused_vs_conv']:.2f}x "
            f"| {r['fused_vs_conv_min']:.2f}x | {r['hoisted_vs_conv']:.2f}x |")
    lines.append("")
    for batch in (1, 8):
        sel = [r for r in rows if r["batch"] == batch]
        fused = geomean([r["fused_vs_conv"] for r in sel])
        lines.append(
            f"- batch {batch}: geometric mean fused / conv **{fused:.3f}x**, "
            f"plain / conv {geomean([r['plain_vs_conv'] for r in sel]):.3f}x; on minimum times "
            f"fused / conv {geomean([r['fused_vs_conv_min'] for r in sel]):.3f}x, plain / conv "
            f"{geomean([r['plain_vs_conv_min'] for r in sel]):.3f}x; the hoisted plan "
            f"{geomean([r['hoisted_vs_conv'] for r in sel]):.3f}x (target: fused within 1.10x)")
    md = "\n".join(lines)
    stem = "op_speed_quick" if args.quick else "op_speed"
    paths = write_results(stem, {"machine": info, "repeats": repeats, "rows": rows}, md)
    print(md)
    print(f"\nwrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
