"""TVM kernels on ResNet-18 conv shapes: dcgraph's fused kernel against the alternatives.

Rows, measured in the same run, interleaved, on one conv + Deep Control + relu block:

- ``torch conv``: PyTorch eager conv alone (oneDNN), the floor users know;
- ``tvm conv``: TVM's conv alone with dcgraph's default conv schedule (the same schedule
  every TVM row gets, so TVM rows differ by fusion only);
- ``tvm fused``: dcgraph's fused kernels, untuned (hoisted shift + conv with the
  scale/shift/relu epilogue);
- ``tvm two-pass``: dcgraph's two-pass form (conv, mean over its output, epilogue);
- ``tvm unfused``: Deep Control as plain Relax ops left to TVM's own FuseOps (conv, then a
  mean, then the fused elementwise chain).

Each TVM row is checked against :func:`dcgraph.reference.conv_deep_control` before timing;
a row that fails is reported as failed, not timed. Tuned rows are the autotuning issue's.

    python benchmarks/tvm_kernels.py [--quick] [--repeats N] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import os

# TVM's worker threads spin after each call, stealing the cores from the next (torch) call
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from tqdm import tqdm
from tvm import relax

from dcgraph import reference as R
from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.lowering import emit_conv_deep_control
from dcgraph.backends.tvm.pipeline import relax_pipeline

try:
    from benchmarks.common import RESNET18, geomean, machine_info, time_interleaved, write_results
except ImportError:  # run as a script from benchmarks/
    from common import RESNET18, geomean, machine_info, time_interleaved, write_results

QUICK = ["layer1", "layer3", "layer4"]
ROWS = ("torch_conv", "tvm_conv", "tvm_fused", "tvm_two_pass", "tvm_unfused")


def _module(kind: str, x_shape, w, a, g, b, stride: int, pad: int) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    wc = relax.const(w.numpy())
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind in ("tvm_fused", "tvm_two_pass"):
                out = emit_conv_deep_control(
                    bb, x, wc, None, relax.const(a.numpy()), relax.const(g.numpy()), relax.const(b.numpy()),
                    stride=stride, padding=pad, act="relu",
                    plan="hoisted" if kind == "tvm_fused" else "two_pass")
            else:
                y = bb.emit(relax.op.nn.conv2d(x, wc, strides=stride, padding=pad))
                if kind == "tvm_unfused":
                    def col(v: torch.Tensor) -> relax.Constant:
                        return relax.const(v.reshape(1, -1, 1, 1).numpy())
                    m = relax.op.mean(y, axis=[2, 3], keepdims=True)
                    z = relax.op.add(relax.op.multiply(relax.op.subtract(y, relax.op.multiply(m, col(a))),
                                                       col(g)), col(b))
                    y = bb.emit(relax.op.nn.relu(z))
                out = y
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    return bb.get()


def bench_shape(name, cin, cout, size, k, stride, batch, repeats, target):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=gen)
    w = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
    a, g, b = torch.rand(cout, generator=gen), 0.5 + torch.rand(cout, generator=gen), torch.randn(cout)
    pad = k // 2
    want = R.conv_deep_control(x.double(), w.double(), None, a.double(), g.double(), b.double(),
                               stride, pad, act="relu").numpy()
    conv_want = F.conv2d(x.double(), w.double(), None, stride, pad).numpy()
    dev = tvm.cpu()
    tx = tvm.runtime.tensor(x.numpy(), dev)
    fns, failed = {}, {}

    def block(call):  # several calls per sample: a thread pool's spin-down after one runtime's
        def run():     # call must not land on the next variant's first call
            for _ in range(inner):
                call()
        return run

    inner = max(1, min(10, int(20e6 / (cout * cin * k * k * (size // stride) ** 2 * batch))))
    with torch.no_grad():
        fns["torch_conv"] = block(lambda: F.conv2d(x, w, None, stride, pad))
    for kind in ROWS[1:]:
        try:
            mod = _module(kind, tuple(x.shape), w, a, g, b, stride, pad)
            ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
            fn = relax.VirtualMachine(ex, dev)["main"]
            got = fn(tx).numpy()
            ref = conv_want if kind == "tvm_conv" else want
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            if not err < 1e-4:
                failed[kind] = f"wrong result: relative error {err:.1e}"
                continue
            fns[kind] = block(lambda fn=fn: fn(tx))
        except Exception as e:  # a row that cannot build is reported, the others still run
            failed[kind] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:120]}"
    with torch.no_grad():
        t = time_interleaved(fns, repeats)
    row = {"layer": name, "batch": batch, "shape": f"{cin}->{cout} {k}x{k}/{stride} @{size}",
           "failed": failed}
    for kind, d in t.items():
        for m, v in d.items():
            row[f"{kind}_{m}"] = v / inner
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three shapes, batch 1, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 20)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch and TVM threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    target = targets.resolve({"kind": "llvm", "mcpu": targets.host_cpu(), "num-cores": args.threads})
    repeats = args.repeats or (5 if args.quick else 20)
    batches = args.batch or ([1] if args.quick else [1, 8])
    shapes = [s for s in RESNET18 if not args.quick or s[0] in QUICK]
    rows = []
    for shape, batch in tqdm([(s, n) for n in batches for s in shapes], desc="tvm kernels", unit="row"):
        rows.append(bench_shape(*shape, batch, repeats, target))
    for r in rows:
        for kind in ROWS[1:]:
            if f"{kind}_median_ms" in r:
                r[f"{kind}_vs_torch_conv"] = r[f"{kind}_median_ms"] / r["torch_conv_median_ms"]
        if "tvm_fused_median_ms" in r and "tvm_conv_median_ms" in r:
            r["tvm_fused_vs_tvm_conv"] = r["tvm_fused_median_ms"] / r["tvm_conv_median_ms"]
        if "tvm_fused_median_ms" in r and "tvm_unfused_median_ms" in r:
            r["tvm_fused_vs_unfused"] = r["tvm_fused_median_ms"] / r["tvm_unfused_median_ms"]
        for kind in ("tvm_fused", "tvm_unfused"):  # minimum times: the least noisy estimate here
            if f"{kind}_min_ms" in r:
                r[f"{kind}_vs_torch_conv_min"] = r[f"{kind}_min_ms"] / r["torch_conv_min_ms"]
        if "tvm_fused_min_ms" in r and "tvm_unfused_min_ms" in r:
            r["tvm_fused_vs_unfused_min"] = r["tvm_fused_min_ms"] / r["tvm_unfused_min_ms"]
    info = machine_info()
    info["tvm"] = tvm.__version__
    info["tvm_target"] = targets.describe(target)

    def cell(r: dict, kind: str) -> str:
        if kind in r["failed"]:
            return "FAILED"
        return f"{r[kind + '_median_ms']:.3f} ({r[kind + '_iqr_ms']:.3f})"

    lines = [
        f"Forward, fp32, {args.threads} threads, {info['cpu']}, TVM {info['tvm']} ({info['tvm_target']}), "
        f"torch {info['torch']}, {info['date']}; median ms of {repeats} interleaved runs (IQR). "
        "TVM rows untuned (dcgraph's default schedule).",
        "",
        "| layer | batch | conv | torch conv | tvm conv | tvm fused | tvm two-pass | tvm unfused "
        "| fused / torch conv | fused / tvm conv | fused / unfused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.2f}x" if key in r else "-"

    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['batch']} | {r['shape']} | " + " | ".join(cell(r, k) for k in ROWS)
            + f" | {ratio(r, 'tvm_fused_vs_torch_conv')} | {ratio(r, 'tvm_fused_vs_tvm_conv')} "
            f"| {ratio(r, 'tvm_fused_vs_unfused')} |")
    lines.append("")
    for batch in batches:
        sel = [r for r in rows if r["batch"] == batch]
        parts = []
        for key, label in (("tvm_fused_vs_torch_conv", "fused / torch conv"),
                           ("tvm_fused_vs_tvm_conv", "fused / tvm conv"),
                           ("tvm_fused_vs_unfused", "fused / unfused"),
                           ("tvm_unfused_vs_torch_conv", "unfused / torch conv"),
                           ("tvm_fused_vs_torch_conv_min", "on minimum times: fused / torch conv"),
                           ("tvm_fused_vs_unfused_min", "fused / unfused")):
            vals = [r[key] for r in sel if key in r]
            if vals:
                parts.append(f"{label} **{geomean(vals):.2f}x**")
        lines.append(f"- batch {batch}, geometric means: " + ", ".join(parts))
    failures = [(r["layer"], r["batch"], k, v) for r in rows for k, v in r["failed"].items()]
    for layer, batch, kind, why in failures:
        lines.append(f"- FAILED {kind} on {layer} batch {batch}: {why}")
    md = "\n".join(lines)
    stem = "tvm_kernels_quick" if args.quick else "tvm_kernels"
    paths = write_results(stem, {"machine": info, "repeats": repeats, "rows": rows}, md)
    print(md)
    print(f"\nwrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
