"""Op level: one conv + Deep Control + activation block, every path side by side.

Rows (``ROWS``), in the issue's order; *family* says what each row is to the comparison:

| key | what | family |
|---|---|---|
| ``torch_conv`` | PyTorch eager conv alone (oneDNN) | floor |
| ``ort_conv`` | ONNX Runtime, a graph of the conv alone | floor |
| ``torch_plain`` | PyTorch eager, Deep Control as plain ops (``dcgraph.functional.deep_control``) | peer |
| ``torch_fused`` | dcgraph's fused PyTorch op (``dcgraph.functional.conv_deep_control``) | dcgraph |
| ``inductor`` | ``torch.compile`` (inductor, default mode) of the plain-ops block | peer |
| ``ort_plain`` | ONNX Runtime, Deep Control as plain ONNX ops (ReduceMean, Mul, Add, act) | peer |
| ``ort_function`` | ONNX Runtime, one ``ai.dcgraph.DeepControlConv`` node (model-local function) | dcgraph |
| ``tvm_unfused`` | TVM, Deep Control as plain Relax ops left to TVM's own FuseOps | peer |
| ``tvm_fused`` | dcgraph's fused TVM kernels, default (untuned) schedule | dcgraph |
| ``tvm_call`` | the same through ``compile()``, called as users do (torch in and out, DLPack) | dcgraph |
| ``tvm_tuned`` | the same kernels with tuned records from ``--db DIR`` (``dcgraph tune``) | dcgraph |

The *floor* of a case is the faster conv alone (PyTorch or ONNX Runtime): what the block
would cost if Deep Control were free. The *best peer* is the fastest row a user could run
without dcgraph; *dcgraph's best* the fastest dcgraph row. Goal (issue 8): dcgraph's best
within 1.05x of the floor. TVM rows get weights as constants, as a compiled model does.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import harness as H
from . import peak
from .onnx_graphs import onnx_model, ort_session
from .op_plot import plot as plot  # the level's plot, where callers have always found it
from .op_rows import FAMILY, GOAL, ROWS
from .shapes import QUICK, SHAPES, OpShape


@dataclass
class Settings:
    threads: int = 2
    repeats: int = 20
    block_ms: float = 10.0
    db: str | None = None
    tune_trials: int = 0  #: tune each block's kernels (dcgraph.backends.tvm.tuning) into ``db`` first
    inductor_max: int | None = None  #: compile at most this many inductor graphs (None: all)
    inductor_budget_s: float = 900.0  #: stop compiling new inductor graphs after this long
    inductor_done: int = 0
    inductor_spent_s: float = 0.0
    target: Any = None
    extra_rows: dict = field(default_factory=dict)  #: test hook: key -> fn(shape, t) -> callable
    only: list[str] | None = None  #: build only these rows (tests; the suite itself runs all)


# ----------------------------------------------------------------------------- ONNX Runtime

def _ort_row(kind: str, s: OpShape, t: dict, st: Settings):
    if importlib.util.find_spec("onnxruntime") is None:
        raise H.Skipped("onnxruntime is not installed (pip install dcgraph[onnx])")
    sess = ort_session(onnx_model(kind, s, t), st.threads)
    feed = {"x": t["x"].numpy()}
    return lambda: sess.run(None, feed)


# ----------------------------------------------------------------------------- TVM

def tvm_module(kind: str, s: OpShape, t: dict):
    """Relax module: ``unfused`` (conv + plain Relax ops) or ``fused`` (dcgraph's kernels), the
    block's weights and parameters as constants."""
    from dcgraph.backends.tvm.modules import block_module

    kind = "fused" if kind == "fused" else "plain"
    return block_module(kind, tuple(t["x"].shape), tuple(t["weight"].shape), act=s.act, stride=s.stride,
                        padding=s.pad, groups=s.groups,
                        consts={k: t[k].numpy() for k in ("weight", "a", "g", "b")})


def tune_available() -> bool:
    """Is the autotuning package (``dcgraph.backends.tvm.tuning``, which needs TVM) there?"""
    try:
        return importlib.util.find_spec("dcgraph.backends.tvm.tuning") is not None
    except ImportError:
        return False


def _tvm_row(kind: str, s: OpShape, t: dict, st: Settings, info: dict):
    import tvm
    from tvm import relax

    from dcgraph.backends.tvm.pipeline import relax_pipeline

    dev = tvm.cpu()
    tx = tvm.runtime.tensor(t["x"].numpy(), dev)
    if kind == "tuned":
        if not tune_available():
            raise H.NotYet("autotuning (dcgraph.backends.tvm.tuning) is not available here")
        if not st.db:
            raise H.NotYet("no tuning database: pass --db DIR (written by dcgraph tune)")
        from dcgraph.backends.tvm import compiler
        from dcgraph.backends.tvm.errors import CompileError

        if st.tune_trials:
            from dcgraph.backends.tvm.tuning import tune

            t0 = time.perf_counter()
            # the kernels with knob spaces (the conv's): MetaSchedule on a block's tiny shift
            # kernel costs a minute and has not beaten its default here
            report = tune(tvm_module("fused", s, t), st.target, None, trials=st.tune_trials, db=st.db,
                          convert=False, fuse_plain=False, progress=False, search="knobs")
            info["tune_s"] = round(time.perf_counter() - t0, 1)
            info["kept"] = {r.name: (r.kept, round(r.speedup, 3) if r.speedup else None)
                            for r in report.tasks}
        try:
            compiled = compiler.compile(tvm_module("fused", s, t), st.target, convert=False, fuse_plain=False,
                                        database=st.db)
        except CompileError as e:
            if "no tuning records" in str(e):
                raise H.NotYet(str(e)) from None
            raise
        dc = [k for k in compiled.kernels if k.origin == "dcgraph"]
        tuned = [k for k in dc if k.schedule == "tuned"]
        info["kernels_tuned"] = f"{len(tuned)}/{len(dc)}"
        if not tuned and not info.get("kept"):  # (tuned here: the defaults won, the row is their build)
            raise H.NotYet(f"no tuned record for this block's kernels in {st.db} (dcgraph tune)")
        vm = compiled.vm()
        fn = vm["main"]
        return lambda: fn(tx)
    ex = tvm.compile(tvm_module(kind, s, t), target=st.target, relax_pipeline=relax_pipeline(st.target))
    fn = relax.VirtualMachine(ex, dev)["main"]
    return lambda: fn(tx)


def _tvm_call_row(s: OpShape, t: dict, st: Settings):
    from dcgraph.backends.tvm import compiler

    compiled = compiler.compile(tvm_module("fused", s, t), st.target, convert=False, fuse_plain=False,
                                shipped=False)
    return lambda x=t["x"]: compiled(x)


# ----------------------------------------------------------------------------- torch

def _inductor_row(s: OpShape, t: dict, st: Settings, info: dict):
    if st.inductor_max is not None and st.inductor_done >= st.inductor_max:
        raise H.Skipped(f"--quick compiles inductor for {st.inductor_max} block(s) only (13-24 s cold each)")
    if st.inductor_spent_s >= st.inductor_budget_s:
        raise H.Skipped(f"inductor compile budget ({st.inductor_budget_s:.0f} s) spent")
    import torch._dynamo

    from dcgraph import functional as DF

    torch._dynamo.reset()  # a fresh cache per block: no recompile limit, no stale guards
    x, w, a, g, b = (t[k] for k in ("x", "weight", "a", "g", "b"))

    def plain(x: torch.Tensor) -> torch.Tensor:
        return DF.deep_control(F.conv2d(x, w, None, s.stride, s.pad, 1, s.groups), a, g, b, s.act)

    compiled = torch.compile(plain, backend="inductor", dynamic=False, fullgraph=True)
    t0 = time.perf_counter()
    try:
        compiled(x)
    finally:
        spent = time.perf_counter() - t0
        st.inductor_done += 1
        st.inductor_spent_s += spent
        info["compile_s"] = round(spent, 1)
    return lambda: compiled(x)


def builders(s: OpShape, t: dict, st: Settings, infos: dict[str, dict]) -> dict[str, Any]:
    """``key -> build()`` for every row of one case."""
    from dcgraph import functional as DF

    x, w, a, g, b = (t[k] for k in ("x", "weight", "a", "g", "b"))
    conv = lambda: lambda: F.conv2d(x, w, None, s.stride, s.pad, 1, s.groups)  # noqa: E731
    return {
        "torch_conv": conv,
        "ort_conv": lambda: _ort_row("conv", s, t, st),
        "torch_plain": lambda: lambda: DF.deep_control(F.conv2d(x, w, None, s.stride, s.pad, 1, s.groups),
                                                       a, g, b, s.act),
        "torch_fused": lambda: lambda: DF.conv_deep_control(x, w, None, a, g, b, s.stride, s.pad,
                                                            groups=s.groups, act=s.act),
        "inductor": lambda: _inductor_row(s, t, st, infos["inductor"]),
        "ort_plain": lambda: _ort_row("plain", s, t, st),
        "ort_function": lambda: _ort_row("function", s, t, st),
        "tvm_unfused": lambda: _tvm_row("unfused", s, t, st, infos["tvm_unfused"]),
        "tvm_fused": lambda: _tvm_row("fused", s, t, st, infos["tvm_fused"]),
        "tvm_call": lambda: _tvm_call_row(s, t, st),
        "tvm_tuned": lambda: _tvm_row("tuned", s, t, st, infos["tvm_tuned"]),
    }


def run_case(s: OpShape, batch: int, st: Settings) -> dict:
    """Check and time every row on one (shape, batch); returns the result row with ratios."""
    from dcgraph import reference as R

    t = s.tensors(batch)
    d = {k: v.double() for k, v in t.items()}
    conv_want = F.conv2d(d["x"], d["weight"], None, s.stride, s.pad, 1, s.groups).numpy()
    want = R.conv_deep_control(d["x"], d["weight"], None, d["a"], d["g"], d["b"], s.stride, s.pad,
                               groups=s.groups, act=s.act).numpy()
    infos: dict[str, dict] = {k: {} for k in [*ROWS, *st.extra_rows]}
    build = builders(s, t, st, infos)
    if st.only is not None:
        build = {k: v for k, v in build.items() if k in st.only}
    for key, make in st.extra_rows.items():  # test hook: extra implementations, checked like any row
        build[key] = lambda make=make: make(s, t)
    cands = [H.Candidate(key, fn, conv_want if FAMILY.get(key) == "floor" else want, info=infos[key])
             for key, fn in build.items()]
    rows = H.check_and_time(cands, st.repeats, st.block_ms)
    rec = {"layer": s.name, "net": s.net, "batch": batch, "shape": s.describe(),
           "gflop": round(s.flops(batch) / 1e9, 4), "rows": rows}
    rec.update(ratios(rows))
    return rec


def ratios(rows: dict[str, dict]) -> dict[str, Any]:
    """Floor, best peer, dcgraph's best and the ratios between them (medians; minima too)."""
    def best(fam: str, metric: str = "median_ms") -> tuple[str | None, float | None]:
        ok = [(r[metric], k) for k, r in rows.items() if FAMILY.get(k) == fam and r.get("status") == H.OK]
        return (min(ok)[1], min(ok)[0]) if ok else (None, None)

    out: dict[str, Any] = {}
    floor_k, floor = best("floor")
    peer_k, peer = best("peer")
    dc_k, dc = best("dcgraph")
    out.update(floor=floor_k, best_peer=peer_k, best_dcgraph=dc_k)
    if floor:
        for r in rows.values():
            if r.get("status") == H.OK:
                r["vs_floor"] = r["median_ms"] / floor
        if dc:
            out["dcgraph_vs_floor"] = dc / floor
        if peer:
            out["peer_vs_floor"] = peer / floor
    if dc and peer:
        out["dcgraph_vs_peer"] = dc / peer
    tuned, untuned = rows.get("tvm_tuned", {}), rows.get("tvm_fused", {})
    if tuned.get("status") == H.OK and untuned.get("status") == H.OK:
        out["tuned_vs_untuned"] = tuned["median_ms"] / untuned["median_ms"]
    _, floor_min = best("floor", "min_ms")
    _, dc_min = best("dcgraph", "min_ms")
    if floor_min and dc_min:
        out["dcgraph_vs_floor_min"] = dc_min / floor_min
    return out


# ----------------------------------------------------------------------------- report

def summarize(recs: list[dict]) -> dict[str, dict]:
    """Geometric means per batch: each row / floor, dcgraph's best / floor and / best peer."""
    out = {}
    for batch in sorted({r["batch"] for r in recs}):
        sel = [r for r in recs if r["batch"] == batch]
        per_row = {}
        for key in {k for r in sel for k in r["rows"]}:
            vals = [r["rows"][key]["vs_floor"] for r in sel if "vs_floor" in r["rows"][key]]
            if vals:
                per_row[key] = {"geomean_vs_floor": H.geomean(vals), "n": len(vals)}
        s: dict[str, Any] = {"cases": len(sel), "rows": per_row}
        for key in ("dcgraph_vs_floor", "dcgraph_vs_peer", "peer_vs_floor", "dcgraph_vs_floor_min",
                    "tuned_vs_untuned"):
            vals = [r[key] for r in sel if key in r]
            if vals:
                s[key] = H.geomean(vals)
        within = [r for r in sel if r.get("dcgraph_vs_floor", float("inf")) <= GOAL]
        s["within_goal"] = f"{len(within)}/{len(sel)}"
        s["goal_met"] = bool(s.get("dcgraph_vs_floor", float("inf")) <= GOAL)
        out[str(batch)] = s
    return out


def markdown(recs: list[dict], summary: dict, head: str, repeats: int, command: str,
             fp32_peak: dict | None = None) -> str:
    keys = [k for k in ROWS if any(k in r["rows"] for r in recs)]
    keys += [k for k in {k for r in recs for k in r["rows"]} if k not in ROWS]
    lines = [
        f"Op level: conv + Deep Control + activation, forward, fp32. {head} Median ms per call of "
        f"{repeats} interleaved samples (± half the IQR); each row checked against dcgraph.reference "
        f"(float64) before timing. Floor = the faster conv alone (PyTorch, ONNX Runtime). "
        f"Command: `{command}`.",
        "",
        "| layer | batch | block | " + " | ".join(ROWS.get(k, (k, ""))[0] for k in keys)
        + " | dcgraph best / floor | dcgraph best / best peer |",
        "|---|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for r in recs:
        cells = [H.fmt_ms(r["rows"][k]) if k in r["rows"] else "-" for k in keys]
        dvf = f"{r['dcgraph_vs_floor']:.2f}x ({ROWS.get(r['best_dcgraph'], ('?',))[0]})" \
            if "dcgraph_vs_floor" in r else "-"
        dvp = f"{r['dcgraph_vs_peer']:.2f}x ({ROWS.get(r['best_peer'], ('?',))[0]})" \
            if "dcgraph_vs_peer" in r else "-"
        lines.append(f"| {r['layer']} | {r['batch']} | {r['shape']} | " + " | ".join(cells)
                     + f" | {dvf} | {dvp} |")
    lines += ["", "Geometric means over the blocks, each row / floor (lower is better; 1.00x = Deep Control "
              "for free):",
              "", "| batch | blocks | " + " | ".join(ROWS.get(k, (k, ""))[0] for k in keys)
              + " | dcgraph best / floor | dcgraph best / best peer | blocks within 1.05x |",
              "|---|---|" + "---|" * len(keys) + "---|---|---|"]
    for batch, s in summary.items():
        cells = [f"{s['rows'][k]['geomean_vs_floor']:.2f}x ({s['rows'][k]['n']})" if k in s["rows"] else "-"
                 for k in keys]
        lines.append(f"| {batch} | {s['cases']} | " + " | ".join(cells)
                     + f" | **{s.get('dcgraph_vs_floor', float('nan')):.2f}x** | "
                     f"{s.get('dcgraph_vs_peer', float('nan')):.2f}x | {s['within_goal']} |")
    lines.append("")
    for batch, s in summary.items():
        verdict = "met" if s["goal_met"] else "NOT met"
        lines.append(f"- batch {batch}: goal (dcgraph's best path within {GOAL:.2f}x of the fastest conv "
                     f"alone, geometric mean) **{verdict}**: {s.get('dcgraph_vs_floor', float('nan')):.2f}x "
                     f"on medians, {s.get('dcgraph_vs_floor_min', float('nan')):.2f}x on minimum times; "
                     f"{s['within_goal']} blocks within {GOAL:.2f}x")
    for batch in summary:
        tv = [(r["tuned_vs_untuned"], r["layer"]) for r in recs if str(r["batch"]) == batch
              and "tuned_vs_untuned" in r]
        if tv:
            lines.append(f"- batch {batch}: tuned / untuned (medians, interleaved) geometric mean "
                         f"{H.geomean([v for v, _ in tv]):.3f}x; best {min(tv)[0]:.2f}x ({min(tv)[1]}), "
                         f"worst {max(tv)[0]:.2f}x ({max(tv)[1]}); "
                         f"{sum(v > 1.05 for v, _ in tv)} of {len(tv)} blocks above 1.05x")
    notes: dict[str, set] = {}
    for r in recs:
        for k, row in r["rows"].items():
            if row.get("status") == H.FAILED:
                lines.append(f"- FAILED {ROWS.get(k, (k,))[0]} on {r['layer']} batch {r['batch']}: "
                             f"{row['why']}")
            elif row.get("status") in (H.NOT_YET, H.SKIPPED):
                notes.setdefault(f"{row['status']}: {ROWS.get(k, (k,))[0]}: {row['why']}", set()).add(
                    f"{r['layer']}/b{r['batch']}")
    lines += [f"- {note} ({len(where)} blocks)" for note, where in notes.items()]
    if fp32_peak is not None:  # how far each kernel is from the machine's limit
        shown = [k for k in ("torch_conv", "ort_conv", "tvm_fused", "tvm_tuned") if k in keys]
        lines += peak.kernel_table(recs, {k: v[0] for k, v in ROWS.items()}, shown, fp32_peak)
    return "\n".join(lines)


def run(quick: bool = False, threads: int = 2, repeats: int | None = None, db: str | None = None,
        batches: list[int] | None = None, shapes: list[str] | None = None, extra_rows: dict | None = None,
        only: list[str] | None = None, write: bool = True, progress: bool = True,
        command: str = "dcgraph bench op", tune_trials: int = 0) -> dict:
    """The op level; writes ``results/fusion_op[_quick].{json,md,png}`` when ``write``."""
    H.set_threads(threads)
    from dcgraph.backends.tvm import targets
    from dcgraph.backends.tvm.schedules import vector_lanes

    st = Settings(threads=threads, repeats=repeats or (5 if quick else 20), block_ms=3.0 if quick else 20.0,
                  db=db, inductor_max=1 if quick else None, extra_rows=dict(extra_rows or {}), only=only,
                  tune_trials=tune_trials,
                  target=targets.resolve({"kind": "llvm", "mcpu": targets.host_cpu(), "num-cores": threads}))
    fp32_peak = peak.measure(threads, vector_lanes(st.target))
    names = shapes or (QUICK if quick else [s.name for s in SHAPES])
    batches = batches or ([1] if quick else [1, 8])
    jobs = [(s, n) for n in batches for s in SHAPES if s.name in names]
    recs = []
    t0 = time.perf_counter()
    for s, batch in jobs:
        rec = run_case(s, batch, st)
        recs.append(rec)
        if progress:
            best = (f"dcgraph best / floor {rec['dcgraph_vs_floor']:.2f}x" if "dcgraph_vs_floor" in rec
                    else "no dcgraph row timed")
            print(f"[op {time.perf_counter() - t0:6.1f}s] {s.name} b{batch}: {best}", flush=True)
    summary = summarize(recs)
    info, head = H.header(threads)
    info["tvm_target"], info["fp32_peak"] = targets.describe(st.target), fp32_peak
    info["ort_threads"] = {"intra_op": threads, "inter_op": 1, "spinning": "off"}
    info["tvm_env"] = {"TVM_NUM_THREADS": str(threads), "TVM_THREAD_POOL_SPIN_COUNT": "0"}
    data = {"level": "op", "quick": quick, "repeats": st.repeats, "block_ms": st.block_ms, "db": db,
            "machine": info, "rows": {k: {"label": v[0], "family": v[1]} for k, v in ROWS.items()},
            "cases": recs, "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
            "command": command}
    md = markdown(recs, summary, head, st.repeats, command, fp32_peak)
    if write:
        name = H.stem("op", quick)
        H.write_results(name, data, md)
        png = plot(recs, name)
        data["files"] = [f"{name}.json", f"{name}.md"] + ([png.name] if png else [])
    data["markdown"] = md
    return data
