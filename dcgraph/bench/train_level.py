"""Training level: one training step of the ResNet-18-like model, three ways.

- ``batchnorm``: the built-in model as written (conv -> BatchNorm -> relu, train mode);
- ``plain``: Deep Control as plain ops (``dcgraph.passes.fx.convert``, ``init="fresh"``: the
  paper's from-scratch start ``a = 1, g = gamma, b = beta``);
- ``fused``: the same, fused into dcgraph's op (``dcgraph.passes.fx.rewrite``), whose backward
  keeps one tensor per block.

A step is forward, cross-entropy, backward and an SGD (momentum) update. Each row runs in a
fresh Python process so that its peak resident set size (``VmHWM``) is its own; the process
reports the median step time, the bytes autograd saves for backward (``dcgraph.memory``, each
storage once) and its RSS before the first step and at its peak. Before any timing, the plain
and fused models (same weights) are checked against each other in this process: the output
and every gradient (Deep Control as plain ops is the reference semantics written in torch).
Those per-process rows run one after another; the step times compared are taken apart, in one
more fresh process that builds all three models and times them interleaved (two steps of each in
turn, the order reversed every round), so that drift hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

VARIANTS = {"batchnorm": "BatchNorm", "plain": "Deep Control, plain ops", "fused": "Deep Control, fused op"}
FAMILY = {"batchnorm": "floor", "plain": "peer", "fused": "dcgraph"}


def build(variant: str, width: int, seed: int = 0):
    import torch

    from dcgraph import zoo

    torch.manual_seed(seed)
    model = zoo.randomize_norm_stats(zoo.resnet18_like(width=width), seed)
    if variant == "batchnorm":
        return model.train()
    from dcgraph.passes.fx import rewrite

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, _ = rewrite(model, init="fresh", fuse_blocks=variant == "fused")
    return net.train()


def _loss(out):
    import torch

    labels = torch.arange(out.shape[0]) % out.shape[1]
    return torch.nn.functional.cross_entropy(out, labels)


def example(batch: int, size: int):
    import torch

    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def agreement(width: int, batch: int, size: int, rtol: float = 1e-4) -> dict[str, Any]:
    """Plain vs fused (same weights): worst relative difference over the output, the input
    gradient and every parameter gradient (parameters paired in order: the passes keep it)."""

    x = example(batch, size)
    results = []
    for variant in ("fused", "plain"):
        net = build(variant, width)
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        _loss(out).backward()
        grads = [p.grad for p in net.parameters()]
        results.append((out.detach(), xi.grad, grads))
    (of, xf, gf), (op, xp, gp) = results
    pairs = [("output", of, op), ("input gradient", xf, xp)]
    if [g.shape for g in gf] == [g.shape for g in gp]:
        pairs += [(f"parameter gradient {i}", a, b) for i, (a, b) in enumerate(zip(gf, gp, strict=True))]
    # a gradient that vanishes mathematically (Deep Control with a = 1 on a 1x1 map: g has no
    # effect) is rounding noise in both: measure every tensor against at least 1e-6 of the largest
    floor = 1e-6 * max(float(ref.abs().max()) for _, _, ref in pairs)
    worst, where = 0.0, ""
    for name, ours, ref in pairs:
        rel = float((ours - ref).abs().max()) / max(float(ref.abs().max()), floor, 1e-30)
        if not math.isfinite(rel):  # NaN must not be overwritten by the next finite value
            rel = math.inf
        if not rel <= worst:
            worst, where = rel, name
    return {"worst": worst, "where": where, "compared": len(pairs), "ok": worst <= rtol, "rtol": rtol}


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(variant: str, width: int, batch: int, size: int, steps: int, threads: int) -> dict[str, Any]:
    """One row, in this (fresh) process: step times, saved bytes, RSS."""
    import torch

    from dcgraph.memory import saved_bytes

    torch.set_num_threads(threads)
    net = build(variant, width)
    x = example(batch, size)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    base_kib = _proc_kib("VmRSS")

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = _loss(net(x))
        loss.backward()
        opt.step()
        return float(loss)

    first_loss = step()  # warm-up (allocates momentum buffers and the allocator's pools)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    peak_kib = _proc_kib("VmHWM")
    s = saved_bytes(lambda: net(x), inputs=[x], modules=[net])
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return {"status": "ok", "first_loss": first_loss, "median_ms": statistics.median(times),
            "iqr_ms": q[2] - q[0], "min_ms": min(times), "steps": steps,
            "saved_bytes": s.activations, "saved_tensors": s.tensors,
            "rss_before_mib": base_kib / 1024, "peak_rss_mib": peak_kib / 1024,
            "step_rss_mib": (peak_kib - base_kib) / 1024}


def interleaved(width: int, batch: int, size: int, rounds: int, threads: int) -> dict[str, Any]:
    """Median step time of every variant, timed in turn in this process (2 steps per turn)."""
    import torch

    torch.set_num_threads(threads)
    x = example(batch, size)
    steps = {}
    for variant in VARIANTS:
        net = build(variant, width)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step(net=net, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            _loss(net(x)).backward()
            opt.step()

        step()  # warm-up
        steps[variant] = step
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(rounds):
        for variant in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            steps[variant]()
            steps[variant]()
            times[variant].append(1e3 * (time.perf_counter() - t0) / 2)
    return {"status": "ok", "rounds": rounds,
            "median_ms": {v: statistics.median(t) for v, t in times.items()}}


def _in_fresh_process(args: list[str], threads: int, timeout: float) -> dict[str, Any]:
    """``python -m dcgraph.bench.train_level ARGS`` in a fresh process: its last JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dcgraph.bench.train_level", *args, "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "why": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "why": f"worker exited {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def _run_worker(variant: str, width: int, batch: int, size: int, steps: int, threads: int,
                timeout: float) -> dict[str, Any]:
    return _in_fresh_process(["--worker", variant, "--width", str(width), "--batch", str(batch),
                              "--size", str(size), "--steps", str(steps)], threads, timeout)


def _run_interleaved(cfg: dict, threads: int, timeout: float) -> dict[str, Any]:
    rounds = max(4, 4 * cfg["steps"])
    return _in_fresh_process(["--interleaved", str(rounds), "--width", str(cfg["width"]), "--batch",
                              str(cfg["batch"]), "--size", str(cfg["size"])], threads, timeout)


def markdown(data: dict) -> str:
    c = data["config"]
    rows = data["rows"]
    ag = data["agreement"]
    lines = [
        f"Training level: one step (forward, cross-entropy, backward, SGD momentum) of the ResNet-18-like "
        f"model (widths {c['width']}..{8 * c['width']}), input {c['batch']}x3x{c['size']}x{c['size']}, fp32. "
        f"{data['head']} Each row in a fresh process: median of {c['steps']} steps after one warm-up. "
        f"Command: `{data['command']}`.",
        "",
        f"Fused vs plain ops (same weights): output, input gradient and {ag.get('compared', 0) - 2} "
        "parameter "
        f"gradients agree to {ag.get('worst', float('nan')):.1e} (worst: {ag.get('where', '?')}; tolerance "
        f"{ag.get('rtol', 0):.0e}): {'ok' if ag.get('ok') else 'FAILED'}.",
        "",
        "| variant | step ms | vs BatchNorm | saved activations MiB | vs BatchNorm | peak RSS MiB "
        "| RSS growth in the steps MiB | vs BatchNorm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    inter = data.get("interleaved", {})
    if inter.get("status") == "ok":
        med = inter["median_ms"]
        lines.insert(3, "Step time, the three variants timed interleaved in one process (median of "
                     f"{inter['rounds']} turns of 2 steps): "
                     + ", ".join(f"{VARIANTS[k]} {med[k]:.1f} ms" for k in VARIANTS)
                     + f". Fused / BatchNorm **{med['fused'] / med['batchnorm']:.3f}x**, fused / plain ops "
                     f"**{med['fused'] / med['plain']:.3f}x**.")
        lines.insert(4, "")
    elif inter:
        lines.insert(3, f"Interleaved timing FAILED: {inter.get('why', '?')}")
        lines.insert(4, "")
    bn = rows.get("batchnorm", {})
    for key, label in VARIANTS.items():
        r = rows.get(key, {})
        if r.get("status") != "ok":
            lines.append(f"| {label} | {r.get('status', '?').upper()}: {r.get('why', '')} | | | | | | |")
            continue

        def rel(field: str, r: dict = r) -> str:
            return f"{r[field] / bn[field]:.2f}x" if bn.get("status") == "ok" and bn.get(field) else "-"

        lines.append(f"| {label} | {r['median_ms']:.1f} ±{r['iqr_ms'] / 2:.1f} | {rel('median_ms')} "
                     f"| {r['saved_bytes'] / 2**20:.1f} | {rel('saved_bytes')} | {r['peak_rss_mib']:.0f} "
                     f"| {r['step_rss_mib']:.0f} | {rel('step_rss_mib')} |")
    return "\n".join(lines)


def plot(data: dict, name: str) -> Path | None:
    """Memory per variant: saved activations and RSS growth during the steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from . import harness as H

    keys = [k for k in VARIANTS if data["rows"].get(k, {}).get("status") == "ok"]
    if not keys:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (field, scale, title) in zip(axes, (("saved_bytes", 2**20, "saved activations (MiB)"),
                                                ("step_rss_mib", 1, "RSS growth during steps (MiB)"),
                                                ("median_ms", 1, "step time (ms)")), strict=True):
        vals = [data["rows"][k][field] / scale for k in keys]
        bars = ax.bar([VARIANTS[k].replace("Deep Control, ", "DC ") for k in keys], vals,
                      color=["#888888", "#1f77b4", "#d62728"][: len(keys)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    c = data["config"]
    fig.suptitle(f"ResNet-18-like training step, batch {c['batch']}, {c['size']}x{c['size']}", fontsize=10)
    fig.tight_layout()
    path = H.save_plot(fig, name)
    plt.close(fig)
    return path


def run(quick: bool = False, threads: int = 2, steps: int | None = None, width: int | None = None,
        batch: int | None = None, size: int | None = None, write: bool = True, progress: bool = True,
        command: str = "dcgraph bench train", timeout: float = 900.0) -> dict:
    """The training level; writes ``results/fusion_train[_quick].{json,md,png}`` when ``write``."""
    from . import harness as H

    H.set_threads(threads)
    cfg = {"width": width or (8 if quick else 64), "batch": batch or (2 if quick else 8),
           "size": size or (64 if quick else 112), "steps": steps or (2 if quick else 5), "threads": threads}
    t0 = time.perf_counter()
    try:
        ag = agreement(cfg["width"], cfg["batch"], cfg["size"])
    except Exception as e:  # reported; the rows still run
        ag = {"ok": False, "why": H.why(e)}
    rows: dict[str, dict] = {}
    for variant in VARIANTS:
        if variant in ("plain", "fused") and not ag.get("ok"):
            rows[variant] = {"status": "failed",
                             "why": "fused and plain-ops Deep Control disagree: not timed"}
            continue
        rows[variant] = _run_worker(variant, cfg["width"], cfg["batch"], cfg["size"], cfg["steps"], threads,
                                    timeout)
        if progress:
            r = rows[variant]
            done = (f"{r['median_ms']:.1f} ms, peak RSS {r['peak_rss_mib']:.0f} MiB" if r["status"] == "ok"
                    else r["why"])
            print(f"[train {time.perf_counter() - t0:6.1f}s] {variant}: {done}", flush=True)
    inter: dict[str, Any] = {}
    if ag.get("ok"):
        inter = _run_interleaved(cfg, threads, timeout)
        if progress:
            print(f"[train {time.perf_counter() - t0:6.1f}s] interleaved: "
                  f"{inter.get('median_ms', inter.get('why'))}", flush=True)
    info, head = H.header(threads)
    data = {"level": "train", "quick": quick, "config": cfg, "agreement": ag, "rows": rows, "machine": info,
            "head": head, "seconds": round(time.perf_counter() - t0, 1), "command": command,
            "labels": VARIANTS, "interleaved": inter}
    md = markdown(data)
    if write:
        name = H.stem("train", quick)
        H.write_results(name, data, md)
        png = plot(data, H.stem("train", quick, "_memory"))
        data["files"] = [f"{name}.json", f"{name}.md"] + ([png.name] if png else [])
    data["markdown"] = md
    return data


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one training-level row in this process (used by run())")
    p.add_argument("--worker", choices=list(VARIANTS))
    p.add_argument("--interleaved", type=int, metavar="ROUNDS",
                   help="time all variants interleaved for ROUNDS turns instead of one row")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.interleaved:
        print(json.dumps(interleaved(a.width, a.batch, a.size, a.interleaved, a.threads)))
    elif a.worker:
        print(json.dumps(worker(a.worker, a.width, a.batch, a.size, a.steps, a.threads)))
    else:
        p.error("give --worker VARIANT or --interleaved ROUNDS")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
