"""ARM level: the op and model levels on emulated aarch64, in executed instructions.

No board is needed and no clock is read: each row is compiled or exported for aarch64 and run in
the emulated arm64 Python under qemu with dcgraph's counting plugin
(:mod:`dcgraph.backends.tvm.remote.arm_count`), one thread, and its executed instructions per
call are counted by class. The same call counted twice gives the same figure, so one count per
row is the result (no repeats, no noise). Every row's output is checked against the float64
reference first, as in the other levels.

Rows, op level (the suite's blocks, batch 1):

- ``ort_conv``: ONNX Runtime (aarch64 wheel, MLAS NEON kernels), a graph of the conv alone (the floor);
- ``ort_plain``: ONNX Runtime, Deep Control as plain ONNX ops (the peer);
- ``tvm_fused``: dcgraph's fused TVM kernels for the ``arm`` target (NEON, 4 lanes), default schedules.

Model level (whole models, batch 1): ``ort_bn`` (ONNX Runtime on the BatchNorm model, which
folds BN into the conv: the floor) and ``tvm_fused`` (dcgraph's compile of the Deep Control model).

Results: ``fusion_arm[_quick].{json,md,png}``. Per row: instructions per call, per multiply-add
of the direct convolution (the fp32 NEON ideal is 0.25: one 4-lane FMA per 4 MACs; Winograd
kernels can go below it, since they do fewer multiplies than the direct conv), the share of
vector FMAs, and the row over the floor. What the count does not capture: cache misses, memory
bandwidth, issue width, latency (see the README).
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import numpy as np
import torch

from . import harness as H
from .shapes import QUICK, SHAPES, OpShape

__all__ = ["run"]

OP_ROWS = {"ort_conv": ("ORT conv alone (aarch64, MLAS)", "floor"),
           "ort_plain": ("ORT Deep Control, plain ops", "peer"),
           "tvm_fused": ("dcgraph TVM fused (NEON)", "dcgraph"),
           "tvm_tuned": ("dcgraph TVM, tuned on instructions", "dcgraph")}
MODEL_ROWS = {"ort_bn": ("ORT, BatchNorm model (BN folded)", "floor"),
              "tvm_fused": ("dcgraph TVM fused (NEON)", "dcgraph"),
              "tvm_tuned": ("dcgraph TVM, tuned on instructions", "dcgraph")}
#: the model level's default models (any of ``dcgraph bench model``'s names work; 224 px, quick 64)
MODELS = ("resnet18", "mobilenet_v2")
IDEAL_PER_MAC = 0.25
#: fp32 relative error allowed against the float64 reference (as the other levels)
TOL = 1e-3


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-12))


def macs_of(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of ``model``'s convolutions and linear layers on ``x``."""
    total = 0

    def hook(mod: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            total += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def _tuned(model: Any, example: Any, db: str | None, name: str, **kw: Any) -> Any:
    """``model`` compiled for ARM with its kernels tuned on executed instructions into ``db/name``
    (:mod:`dcgraph.backends.tvm.tuning.count_search`; a second run reuses the counts)."""
    from dcgraph.backends.tvm import compiler
    from dcgraph.backends.tvm.remote.arm_server import arm_target
    from dcgraph.backends.tvm.tuning import tune

    where = f"{db}/{name}"
    tune(model, "arm", example, db=where, cost="instructions", progress=False, **kw)
    return compiler.compile(model, arm_target(), example, database=where, **kw).executable


def _op_objects(s: OpShape, db: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray,
                                                            float]:
    """One block's rows (objects to count), the wanted outputs, its input and MACs; ``db``: also
    the block tuned on instructions (records under ``db``)."""
    import torch.nn.functional as F
    import tvm

    from dcgraph import reference as R
    from dcgraph.backends.tvm.pipeline import relax_pipeline
    from dcgraph.backends.tvm.remote.arm_server import arm_target

    from .onnx_graphs import onnx_model
    from .op_level import tvm_module

    t = s.tensors(1)
    d = {k: v.double() for k, v in t.items()}
    conv_want = F.conv2d(d["x"], d["weight"], None, s.stride, s.pad, 1, s.groups).numpy()
    want = R.conv_deep_control(d["x"], d["weight"], None, d["a"], d["g"], d["b"], s.stride, s.pad,
                               groups=s.groups, act=s.act).numpy()
    tgt = arm_target()
    fused = tvm.compile(tvm_module("fused", s, t), target=tgt, relax_pipeline=relax_pipeline(tgt))
    objects = {"ort_conv": onnx_model("conv", s, t), "ort_plain": onnx_model("plain", s, t),
               "tvm_fused": fused}
    wants = {"ort_conv": conv_want, "ort_plain": want, "tvm_fused": want, "tvm_tuned": want}
    if db is not None:
        objects["tvm_tuned"] = _tuned(tvm_module("fused", s, t), None, db, s.name, convert=False,
                                      fuse_plain=False)
    return objects, wants, t["x"].numpy(), s.flops(1) / 2


def hot_loop(executable: Any) -> dict[str, Any] | None:
    """llvm-mca's view of the hottest inner loop (most FMAs) of a TVM library built for aarch64
    (:mod:`dcgraph.backends.tvm.remote.arm_mca`), or None where there is none or no llvm-mca."""
    from dcgraph.backends.tvm.remote import arm_mca

    if arm_mca.mca_tool() is None:
        return None
    asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports)
    loop = arm_mca.hottest_loop(asm, ("dc_conv", "dc_winograd", "dc_depthwise"))
    if loop is None:
        return None
    out: dict[str, Any] = {"fmas": loop.fmas, "instructions": len(loop.body)}
    for core in arm_mca.CORES:
        try:
            out[core] = arm_mca.mca(loop, core)
        except RuntimeError as e:
            out[core] = {"error": str(e)}
    return out


def _model_objects(name: str, width: int, size: int, db: str | None = None
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray, float]:
    from dcgraph import zoo
    from dcgraph.backends.tvm import compiler
    from dcgraph.backends.tvm.remote.arm_server import arm_target
    from dcgraph.onnx_export import export_onnx
    from dcgraph.passes.fx import rewrite
    from dcgraph.testing import live_mean

    from .model_level import model_spec

    torch.manual_seed(0)
    bn = zoo.randomize_norm_stats(model_spec(name)[0](width=width)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewrite(bn)
        plain = live_mean(bn).eval()  # the mean path live (a != 0), as the model level
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_bn = copy.deepcopy(bn).double()(x.double()).numpy()
        want = copy.deepcopy(plain).double()(x.double()).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_bn = export_onnx(bn, x)
    compiled = compiler.compile(plain, arm_target(), x, shipped=False)
    objects = {"ort_bn": onnx_bn, "tvm_fused": compiled.executable}
    if db is not None:
        objects["tvm_tuned"] = _tuned(plain, x, db, f"{name}-{size}", convert=True)
    wants = {"ort_bn": want_bn, "tvm_fused": want, "tvm_tuned": want}
    return objects, wants, x.numpy(), float(macs_of(bn, x))


def _rows(counts: dict, outputs: dict, case: str, wants: dict, macs: float, row_names: dict) -> dict:
    rows: dict[str, dict] = {}
    floor = None
    for key in row_names:
        if f"{case}/{key}" not in counts:
            continue
        c = counts[f"{case}/{key}"]
        err = _rel_err(outputs[f"{case}/{key}"], wants[key])
        r = {"status": H.OK if err < TOL else H.FAILED, "error": err, "instructions": c.total,
             "per_mac": c.total / macs, "fma_share": c.fma_share, "counts": c.as_dict()}
        if err >= TOL:
            r["why"] = f"wrong result: relative error {err:.1e} (tolerance {TOL:.0e})"
        if row_names[key][1] == "floor":
            floor = c.total
        rows[key] = r
    for r in rows.values():
        if floor:
            r["vs_floor"] = r["instructions"] / floor
    return rows


def _count_all(cases: list[tuple[str, dict, dict, np.ndarray, float]], progress: bool) -> tuple[dict, dict]:
    import os
    import tempfile

    from dcgraph.backends.tvm.remote.arm_count import count, object_items

    outputs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="dcgraph-bench-arm-") as tmp:
        items = []
        for i, (case, objects, _, x, _) in enumerate(cases):
            os.mkdir(where := f"{tmp}/{i}")
            items += object_items({f"{case}/{key}": obj for key, obj in objects.items()}, [x], where)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="counting on emulated aarch64", unit="row")

        def tick(done: int, name: str) -> None:
            if bar is not None:
                bar.set_postfix_str(name)
                bar.update(done - bar.n)

        try:
            counts = count(items, outputs=outputs, progress=tick)
        finally:
            if bar is not None:
                bar.close()
    return counts, outputs


def markdown(data: dict) -> str:
    host = data["machine"].get("host", "?")
    lines = [f"# ARM level: executed instructions on emulated aarch64 ({data['command']})", "",
             f"qemu-user {data['machine']['qemu']} (`QEMU_CPU=cortex-a72`) on {host}, one thread, "
             "dcgraph's counting "
             f"plugin; ONNX Runtime {data['machine']['onnxruntime_aarch64']} (aarch64 wheel); TVM target "
             f"`{data['machine']['tvm_target']}`. Counts are exact and reproducible (no timing). "
             "Per MAC: instructions per multiply-add of the direct conv (fp32 NEON ideal 0.25). "
             "Not captured: cache misses, bandwidth, issue width, latency. The hot loop column: "
             "llvm-mca (LLVM 14) on the innermost loop with the most FMAs of dcgraph's block, "
             "FMAs per cycle on its Cortex-A57 model (what LLVM 14 uses for A72 / A76 / Neoverse "
             "N1; peak 1.0) and Cortex-A55 model (in order).", ""]
    for level, rows in (("op", OP_ROWS), ("model", MODEL_ROWS)):
        recs = [c for c in data["cases"] if c["level"] == level]
        if not recs:
            continue
        rows = {k: v for k, v in rows.items() if any(k in c["rows"] for c in recs)}
        hot_head = " dcgraph's hot loop: FMAs/iter, FMA/cycle (A57 / A55 model) |" if level == "op" else ""
        lines += [f"## {level} level (batch 1)", "",
                  "| case | MMAC | " + " | ".join(f"{v[0]}: M instr (per MAC, FMA)" for v in rows.values())
                  + " | dcgraph's best / floor |" + hot_head,
                  "|---|---:|" + "---:|" * len(rows) + "---:|" + ("---:|" if level == "op" else "")]
        for c in recs:
            cells = []
            for k in rows:
                r = c["rows"].get(k)
                if r is None:
                    cells.append("-")
                    continue
                bad = "" if r["status"] == H.OK else " **FAILED**"
                cells.append(f"{r['instructions'] / 1e6:.1f} ({r['per_mac']:.3f}, {r['fma_share']:.0%}){bad}")
            vs = c.get("dcgraph_vs_floor")
            ratio = f"{vs:.2f}x" if vs else "-"
            hot = ""
            if level == "op":
                h = c["rows"]["tvm_fused"].get("hot_loop") or {}
                per = [h.get(core, {}).get("fmas_per_cycle") for core in ("cortex-a57", "cortex-a55")]
                hot = (f" {h['fmas']}, {per[0]:.2f} / {per[1]:.2f} |" if h and None not in per else " - |")
            row = f"| {c['case']} | {c['macs'] / 1e6:.1f} | " + " | ".join(cells)
            lines.append(f"{row} | {ratio} |{hot}")
        g = data["summary"].get(level)
        if g:
            peer = f"; dcgraph / best peer {g['dcgraph_vs_peer']:.2f}x" if "dcgraph_vs_peer" in g else ""
            tuned = f"; tuned / untuned {g['tuned_vs_untuned']:.3f}x" if "tuned_vs_untuned" in g else ""
            best = f"**{g['dcgraph_vs_floor']:.2f}x**"
            lines += ["", f"Geometric mean, dcgraph's best / floor: {best}{peer}{tuned}", ""]
    lines.append(f"Seconds: {data['seconds']}")
    return "\n".join(lines) + "\n"


def _summary(cases: list[dict]) -> dict:
    from .common import geomean

    out = {}
    for level in ("op", "model"):
        sel = [c for c in cases if c["level"] == level and c.get("dcgraph_vs_floor")]
        if sel:
            s = {"dcgraph_vs_floor": geomean([c["dcgraph_vs_floor"] for c in sel])}
            if level == "op":
                s["dcgraph_vs_peer"] = geomean([c["dcgraph_best"] / c["rows"]["ort_plain"]["instructions"]
                                                for c in sel])
            tuned = [c["rows"]["tvm_tuned"]["instructions"] / c["rows"]["tvm_fused"]["instructions"]
                     for c in sel if c["rows"].get("tvm_tuned", {}).get("status") == H.OK]
            if tuned:
                s["tuned_vs_untuned"] = geomean(tuned)
            out[level] = s
    return out


def _best(rows: dict) -> dict:
    """dcgraph's best row (fewest instructions, checked) and its ratio to the floor."""
    ok = [(r["instructions"], k) for k, r in rows.items()
          if k.startswith("tvm_") and r["status"] == H.OK and r.get("vs_floor")]
    if not ok:
        return {}
    n, k = min(ok)
    return {"dcgraph_best": n, "best_dcgraph": k, "dcgraph_vs_floor": rows[k]["vs_floor"]}


def _machine() -> dict:
    import subprocess

    from dcgraph.backends.tvm import targets
    from dcgraph.backends.tvm.remote.arm_count import ORT_VERSION, QEMU_DYNAMIC
    from dcgraph.backends.tvm.remote.arm_server import arm_target

    ver = subprocess.run([QEMU_DYNAMIC, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    from .common import machine_info

    return {**H.versions(), "host": machine_info().get("cpu", "?"),
            "qemu": ver.replace("qemu-aarch64 version ", ""), "onnxruntime_aarch64": ORT_VERSION,
            "tvm_target": targets.describe(arm_target())}


def plot(data: dict, name: str) -> Any:
    """Per case: each row's instructions / the floor's (ORT's conv alone; at the model level ORT on
    the BatchNorm model), op and model levels side by side; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = data["cases"]
    keys = [k for k in (*OP_ROWS, *MODEL_ROWS) if any(k in c["rows"] for c in cases)]
    keys = list(dict.fromkeys(keys))
    labels = {**{k: v[0] for k, v in MODEL_ROWS.items()}, **{k: v[0] for k, v in OP_ROWS.items()}}
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(cases) + 3), 4))
    width = 0.8 / max(1, len(keys))
    cmap = plt.get_cmap("tab10")
    for i, k in enumerate(keys):
        xs, ys = [], []
        for j, c in enumerate(cases):
            v = c["rows"].get(k, {}).get("vs_floor")
            if v:
                xs.append(j + (i - (len(keys) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=labels[k], color=cmap(i % 10),
               hatch="//" if k.startswith("tvm_") else None, edgecolor="white", linewidth=0.3)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)), [c["case"] for c in cases], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("executed instructions / floor")
    ax.set_title("emulated aarch64, batch 1: instructions per call over ORT's conv alone "
                 "(models: over ORT on the BN model); hatched: dcgraph", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = H.save_plot(fig, name)
    plt.close(fig)
    return path


def run(quick: bool = False, shapes: list[str] | None = None, models: list[str] | None = None,
        write: bool = True, progress: bool = True, command: str = "dcgraph bench arm",
        tune_db: str | None = None) -> dict:
    """The ARM level; writes ``results/fusion_arm[_quick].{json,md}`` when ``write``. ``models``:
    [] for none (op level only); ``shapes``: [] for none. ``tune_db``: also a ``tvm_tuned`` row,
    each block and model tuned on executed instructions first (records under that directory;
    a second run reuses them)."""
    from dcgraph.backends.tvm.remote.arm_count import ensure_counter

    from .common import write_results

    t0 = time.perf_counter()
    say = (lambda m: print(f"[arm {time.perf_counter() - t0:6.1f}s] {m}", flush=True)) if progress else None
    ensure_counter(progress=say)  # set-up first: a missing tool fails before any compile
    names = (QUICK if quick else [s.name for s in SHAPES]) if shapes is None else shapes
    model_names = (["resnet18"] if quick else list(MODELS)) if models is None else models
    size = 64 if quick else 224
    built = []
    for s in SHAPES:
        if s.name in names:
            if say:
                say(f"building {s.name} for aarch64")
            objects, wants, x, macs = _op_objects(s, tune_db)
            built.append(("op", s.name, objects, wants, x, macs, OP_ROWS))
    from .model_level import model_spec

    for name in model_names:
        width = model_spec(name)[2 if quick else 1]
        if say:
            say(f"building {name} (width {width}, {size} px) for aarch64")
        objects, wants, x, macs = _model_objects(name, width, size, tune_db)
        built.append(("model", name, objects, wants, x, macs, MODEL_ROWS))
    counts, outputs = _count_all([(c[1], c[2], c[3], c[4], c[5]) for c in built], progress)
    cases = []
    for level, case, objects, wants, x, macs, row_names in built:
        rows = _rows(counts, outputs, case, wants, macs, row_names)
        if level == "op":  # the fused block's micro-kernel, statically (a second opinion)
            rows["tvm_fused"]["hot_loop"] = hot_loop(objects["tvm_fused"])
        cases.append({"level": level, "case": case, "input": list(x.shape), "macs": macs, "rows": rows,
                      **_best(rows)})
    data = {"level": "arm", "quick": quick, "machine": _machine(), "command": command,
            "rows": {"op": OP_ROWS, "model": MODEL_ROWS}, "ideal_per_mac": IDEAL_PER_MAC,
            "cases": cases, "summary": _summary(cases), "seconds": round(time.perf_counter() - t0, 1)}
    md = markdown(data)
    if write:
        name = H.stem("arm", quick)
        write_results(name, data, md)
        png = plot(data, name)
        data["files"] = [f"{name}.json", f"{name}.md"] + ([png.name] if png else [])
    data["markdown"] = md
    return data
