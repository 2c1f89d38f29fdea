"""Model level: whole models converted to Deep Control, inference through every path.

The built-in ResNet-18-like and MobileNetV2-like models (``dcgraph.zoo``; BatchNorm with
non-trivial statistics) are converted to Deep Control and then given ``a`` in [0.5, 1.5)
(:func:`dcgraph.testing.live_mean`), so the per-sample mean is live in every block. Before it
is timed, every BatchNorm row must reproduce the BatchNorm model and every Deep Control row the
converted model run as plain ops in float64 (relative tolerance 1e-3 for float32 through ~20
layers). The rows time the same work as with the exact ``preserve`` init (``a = 0``), under which
a broken mean path would pass the check.

| key | what | family |
|---|---|---|
| ``bn_eager`` | the original BatchNorm model, PyTorch eager | baseline |
| ``bn_ort`` | the original BatchNorm model in ONNX Runtime (which folds BN into the conv) | baseline |
| ``plain_eager`` | Deep Control as plain ops (``dcgraph.passes.fx`` convert, not fused), eager | peer |
| ``fused_eager`` | dcgraph's fused op (convert + fuse), eager | dcgraph |
| ``inductor`` | ``torch.compile`` (inductor) of the plain-ops model | peer |
| ``torch_compile`` | ``torch.compile(backend="dcgraph")`` of the same plain-ops model | dcgraph |
| ``ort_plain`` | the plain-ops model exported to ONNX, ONNX Runtime | peer |
| ``ort_function`` | the fused model exported with ``DeepControlConv`` functions, ONNX Runtime | dcgraph |
| ``tvm_unfused`` | the plain-ops model through TVM, Deep Control left to TVM's own fusion | peer |
| ``tvm_fused`` | ``dcgraph.backends.tvm.compile`` (dcgraph's fused kernels, default schedules) | dcgraph |
| ``tvm_tuned`` | the same with tuned records from ``--db DIR`` | dcgraph |

*Baseline*: the fastest BatchNorm row, the cost of the model users have today (at
inference BatchNorm folds into the conv, so it is the model's conv-alone floor).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any

import torch

from dcgraph import zoo

from . import harness as H
from .op_level import ort_session, tune_available

ROWS: dict[str, tuple[str, str]] = {
    "bn_eager": ("BatchNorm model, PyTorch eager", "floor"),
    "bn_ort": ("BatchNorm model, ONNX Runtime (BN folded)", "floor"),
    "plain_eager": ("DC plain ops, PyTorch eager", "peer"),
    "fused_eager": ("DC fused op, PyTorch eager", "dcgraph"),
    "inductor": ("DC plain ops, torch.compile (inductor)", "peer"),
    "torch_compile": ("DC plain ops, torch.compile (dcgraph)", "dcgraph"),
    "ort_plain": ("DC plain ops, ONNX Runtime", "peer"),
    "ort_function": ("DC DeepControlConv functions, ONNX Runtime", "dcgraph"),
    "tvm_unfused": ("DC plain ops, TVM's own fusion", "peer"),
    "tvm_fused": ("dcgraph TVM, untuned", "dcgraph"),
    "tvm_tuned": ("dcgraph TVM, tuned", "dcgraph"),
}
FAMILY = {k: fam for k, (_, fam) in ROWS.items()}
# name -> (factory, width full, width quick, description)
MODELS = {
    "resnet18": (zoo.resnet18_like, 64, 16, "ResNet-18-like (widths 64..512: ResNet-18's)"),
    "mobilenet_v2": (zoo.mobilenet_v2_like, 16, 8, "MobileNetV2-like (5 inverted residuals, widths 32..128)"),
    "efficientnet": (zoo.efficientnet_like, 16, 8,
                     "EfficientNet-B0-like (3 MBConv blocks: silu, depthwise, squeeze-excitation; "
                     "widths 32..128)"),
}


PYTORCHCV = "pytorchcv:"


def model_spec(name: str) -> tuple[Any, int, int, str]:
    """``(factory(width=...), width, quick width, description)`` of a model name: one of
    :data:`MODELS`, or ``pytorchcv:<module>.<function>`` (a model a user brings, e.g.
    ``pytorchcv:mobilenetv2.mobilenetv2_w1``; its own widths, ``width`` ignored)."""
    if name in MODELS:
        return MODELS[name]
    if not name.startswith(PYTORCHCV):
        raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)} or "
                         f"{PYTORCHCV}<module>.<function>")
    module, _, fn = name[len(PYTORCHCV):].rpartition(".")
    import importlib

    try:
        factory = getattr(importlib.import_module(f"pytorchcv.models.{module}"), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"no pytorchcv model {module}.{fn} ({e}); pip install pytorchcv") from None
    return (lambda width=None: factory()), 0, 0, f"pytorchcv's {fn} (its own definition, BatchNorm converted)"


class _Model:
    """One model's variants, built once and shared by its batch sizes (exports are slow)."""

    def __init__(self, name: str, width: int, size: int, threads: int, target: Any, db: str | None,
                 quick: bool, tune_trials: int = 0) -> None:
        from dcgraph.passes.fx import fuse, rewrite
        from dcgraph.testing import live_mean

        self.name, self.size, self.threads, self.quick = name, size, threads, quick
        self.target, self.db, self.tune_trials = target, db, tune_trials
        torch.manual_seed(0)
        self.bn = zoo.randomize_norm_stats(model_spec(name)[0](width=width)).eval()
        self.bn64 = copy.deepcopy(self.bn).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, self.report = rewrite(self.bn)
            # the Deep Control rows run the converted model with the mean path live (a != 0): the
            # exact preserve init (a = 0) would let a broken mean pass the check
            self.plain = live_mean(self.bn)
            self.fused, _ = fuse(self.plain)
        self.fused.eval()
        self.plain64 = copy.deepcopy(self.plain).double()
        self._onnx: dict[str, Any] = {}
        self.info: dict[str, Any] = {"rewrites": self.report.summary().splitlines()[0]}

    def example(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, self.size, self.size, generator=torch.Generator().manual_seed(batch))

    def onnx(self, kind: str, x: torch.Tensor):
        if kind not in self._onnx:
            from dcgraph.onnx_export import export_onnx

            module = {"bn": self.bn, "plain": self.plain, "function": self.fused}[kind]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                self._onnx[kind] = export_onnx(module, x)  # dynamic batch: one export for every batch
                self.info[f"onnx_export_{kind}_s"] = round(time.perf_counter() - t0, 1)
        return self._onnx[kind]

    def ort(self, kind: str, x: torch.Tensor):
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            raise H.Skipped("onnxruntime is not installed (pip install dcgraph[onnx])")
        sess = ort_session(self.onnx(kind, x), self.threads)
        name = sess.get_inputs()[0].name
        feed = {name: x.numpy()}
        return lambda: sess.run(None, feed)

    def tvm(self, kind: str, x: torch.Tensor, info: dict):
        from dcgraph.backends.tvm import compiler
        from dcgraph.backends.tvm.errors import CompileError

        t0 = time.perf_counter()
        if kind == "unfused":
            with torch.no_grad():
                program = torch.export.export(self.plain, (x,))
            compiled = compiler.compile(program, self.target, x, convert=False, fuse_plain=False,
                                        shipped=False)
        else:
            db = None
            if kind == "tuned":
                if not tune_available():
                    raise H.NotYet("autotuning (dcgraph.backends.tvm.tuning) is not available here")
                db = self.db  # None: dcgraph's shipped records for this CPU family, if any
                if self.tune_trials:
                    from dcgraph.backends.tvm.tuning import tune

                    tune(self.plain, self.target, x, trials=self.tune_trials, db=db, progress=False)
                    info["tune_s"] = round(time.perf_counter() - t0, 1)
            try:
                # untuned: the default schedules; tuned: --db, else dcgraph's shipped records
                compiled = compiler.compile(self.plain, self.target, x, database=db,
                                            shipped=kind == "tuned")
            except CompileError as e:
                if "no tuning records" in str(e):
                    raise H.NotYet(str(e)) from None
                raise
        info["compile_s"] = round(time.perf_counter() - t0, 1)
        info["kernels"] = compiled.summary()
        if kind == "tuned" and not any(k.schedule == "tuned" for k in compiled.kernels):
            where = self.db or "dcgraph's shipped records"
            raise H.NotYet(f"no tuned record for this model's kernels in {where} (dcgraph tune)")
        if kind == "tuned":
            info["records"] = compiled.records
        import tvm

        fn = compiled.vm()["main"]
        tx = tvm.runtime.tensor(x.numpy(), compiled.device())
        return lambda: fn(tx)

    def inductor(self, x: torch.Tensor, info: dict, backend: str = "inductor"):
        if self.quick:
            raise H.Skipped("--quick: whole-model torch.compile takes 5-60 s cold")
        options = {"target": self.target, "convert": False} if backend == "dcgraph" else None
        compiled = torch.compile(self.plain, backend=backend, dynamic=False, options=options)
        t0 = time.perf_counter()
        compiled(x)
        info["compile_s"] = round(time.perf_counter() - t0, 1)
        return lambda: compiled(x)

    def candidates(self, batch: int, only: list[str] | None = None) -> list[H.Candidate]:
        import torch._dynamo

        torch._dynamo.reset()  # once per case: both torch.compile rows stay compiled while timed
        x = self.example(batch)
        with torch.no_grad():
            want_bn = self.bn64(x.double()).numpy()  # the BatchNorm rows
            want = self.plain64(x.double()).numpy()  # the Deep Control rows (a != 0)
        infos: dict[str, dict] = {k: {} for k in ROWS}
        build = {
            "bn_eager": lambda: lambda: self.bn(x),
            "bn_ort": lambda: self.ort("bn", x),
            "plain_eager": lambda: lambda: self.plain(x),
            "fused_eager": lambda: lambda: self.fused(x),
            "inductor": lambda: self.inductor(x, infos["inductor"]),
            "torch_compile": lambda: self.inductor(x, infos["torch_compile"], "dcgraph"),
            "ort_plain": lambda: self.ort("plain", x),
            "ort_function": lambda: self.ort("function", x),
            "tvm_unfused": lambda: self.tvm("unfused", x, infos["tvm_unfused"]),
            "tvm_fused": lambda: self.tvm("fused", x, infos["tvm_fused"]),
            "tvm_tuned": lambda: self.tvm("tuned", x, infos["tvm_tuned"]),
        }
        return [H.Candidate(k, fn, want_bn if k.startswith("bn_") else want, tol=1e-3, info=infos[k])
                for k, fn in build.items() if only is None or k in only]


def ratios(rows: dict[str, dict]) -> dict[str, Any]:
    def best(fam: str) -> tuple[float, str] | None:
        ok = [(r["median_ms"], k) for k, r in rows.items()
              if FAMILY.get(k) == fam and r.get("status") == H.OK]
        return min(ok) if ok else None

    out: dict[str, Any] = {}
    floor, peer, dc = best("floor"), best("peer"), best("dcgraph")
    out.update(floor=floor and floor[1], best_peer=peer and peer[1], best_dcgraph=dc and dc[1])
    if floor:
        for r in rows.values():
            if r.get("status") == H.OK:
                r["vs_floor"] = r["median_ms"] / floor[0]
        if dc:
            out["dcgraph_vs_floor"] = dc[0] / floor[0]
        if peer:
            out["peer_vs_floor"] = peer[0] / floor[0]
    if dc and peer:
        out["dcgraph_vs_peer"] = dc[0] / peer[0]
    return out


def markdown(recs: list[dict], head: str, repeats: int, command: str) -> str:
    keys = list(ROWS)
    lines = [
        f"Model level: inference latency, fp32. {head} Median ms of {repeats} interleaved runs "
        f"(± half the IQR); each row checked against the BatchNorm model in float64 first. "
        f"Baseline = the faster BatchNorm row. Command: `{command}`.",
        "",
        "| model | input | " + " | ".join(ROWS[k][0] for k in keys)
        + " | dcgraph best / baseline | dcgraph best / best peer |",
        "|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for r in recs:
        cells = [H.fmt_ms(r["rows"][k]) if k in r["rows"] else "-" for k in keys]
        dvf = (f"{r['dcgraph_vs_floor']:.2f}x ({ROWS[r['best_dcgraph']][0]})" if "dcgraph_vs_floor" in r
               else "-")
        dvp = f"{r['dcgraph_vs_peer']:.2f}x ({ROWS[r['best_peer']][0]})" if "dcgraph_vs_peer" in r else "-"
        lines.append(f"| {r['model']} | {r['input']} | " + " | ".join(cells) + f" | {dvf} | {dvp} |")
    lines.append("")
    lines += _geomeans(recs)
    for r in recs:
        for k, row in r["rows"].items():
            if row.get("status") != H.OK:
                lines.append(f"- {row['status']}: {ROWS[k][0]} on {r['model']} {r['input']}: {row['why']}")
        for k in ("tvm_fused", "tvm_tuned"):
            row = r["rows"].get(k, {})
            if "kernels" in row:
                spent = f" (tuning this run: {row['tune_s']:.0f} s)" if row.get("tune_s") else ""
                lines.append(f"- {r['model']} {r['input']}, {ROWS[k][0]}: {row['kernels']}{spent}")
    return "\n".join(lines)


def _geomeans(recs: list[dict]) -> list[str]:
    """Per batch, over the models: dcgraph TVM untuned / ORT on the BN-folded model, and dcgraph's
    best / the best other way to run the Deep Control model (issue 15's goals: <= 1.0x, <= 0.85x)."""
    lines = []
    for batch in sorted({r["batch"] for r in recs}):
        rs = [r for r in recs if r["batch"] == batch]
        pairs = [(r["rows"].get("tvm_fused", {}), r["rows"].get("bn_ort", {})) for r in rs]
        tvm_ort = [a["median_ms"] / b["median_ms"] for a, b in pairs
                   if a.get("status") == H.OK and b.get("status") == H.OK]
        peer = [r["dcgraph_vs_peer"] for r in rs if "dcgraph_vs_peer" in r]
        parts = []
        if tvm_ort:
            mean = math.prod(tvm_ort) ** (1 / len(tvm_ort))
            parts.append(f"dcgraph TVM untuned / ONNX Runtime BN folded {mean:.2f}x "
                         f"over {len(tvm_ort)} models")
        if peer:
            parts.append(f"dcgraph best / best peer {math.prod(peer) ** (1 / len(peer)):.2f}x")
        if parts:
            lines.append(f"- batch {batch}, geometric means: " + "; ".join(parts))
    return [*lines, ""] if lines else []


def run(quick: bool = False, threads: int = 2, repeats: int | None = None, db: str | None = None,
        models: list[str] | None = None, batches: list[int] | None = None, size: int | None = None,
        width: int | None = None, only: list[str] | None = None, write: bool = True, progress: bool = True,
        command: str = "dcgraph bench model", tune_trials: int = 0) -> dict:
    """The model level; writes ``results/fusion_model[_quick].{json,md}`` when ``write``."""
    H.set_threads(threads)
    from dcgraph.backends.tvm import targets

    target = targets.resolve({"kind": "llvm", "mcpu": targets.host_cpu(), "num-cores": threads})
    repeats = repeats or (3 if quick else 10)
    size = size or (64 if quick else 224)
    names = models or (["resnet18"] if quick else list(MODELS))
    specs = {name: model_spec(name) for name in names}  # a wrong name fails before any work
    batches = batches or ([1] if quick else [1, 8])
    recs = []
    t0 = time.perf_counter()
    for name in names:
        w = width or specs[name][2 if quick else 1]  # each model its own (width=None: its default)
        m = _Model(name, w, size, threads, target, db, quick, tune_trials)
        for batch in batches:
            rows = H.check_and_time(m.candidates(batch, only), repeats, block_ms=0.0, warmup=1)
            rec = {"model": name, "description": specs[name][3], "width": w, "batch": batch,
                   "input": f"{batch}x3x{size}x{size}", "rows": rows, **m.info}
            rec.update(ratios(rows))
            recs.append(rec)
            if progress:
                best = (f"dcgraph best / baseline {rec['dcgraph_vs_floor']:.2f}x" if "dcgraph_vs_floor" in rec
                        else "no dcgraph row timed")
                print(f"[model {time.perf_counter() - t0:6.1f}s] {name} b{batch}: {best}", flush=True)
    info, head = H.header(threads)
    info["tvm_target"] = targets.describe(target)
    data = {"level": "model", "quick": quick, "repeats": repeats, "db": db, "machine": info,
            "rows": {k: {"label": v[0], "family": v[1]} for k, v in ROWS.items()}, "cases": recs,
            "seconds": round(time.perf_counter() - t0, 1), "command": command}
    md = markdown(recs, head, repeats, command)
    if write:
        # models a user brings get their own file: the built-in models' results stay as they are
        name = H.stem("model", quick, "" if all(n in MODELS for n in names) else "_user")
        H.write_results(name, data, md)
        data["files"] = [f"{name}.json", f"{name}.md"]
    data["markdown"] = md
    return data
