"""GPU level: the op level on CUDA, PyTorch (cuDNN) rows and TVM CUDA rows side by side.

The machine that compiles TVM code here has no GPU, and the GPU machine has no TVM compiler
(:mod:`.gpu_runtime`), so this level has two halves:

    dcgraph bench gpu --gpu-mode build     # here: compile every TVM CUDA row into build/fusion_gpu/
    benchmarks/gpu_run.sh [--quick]        # there: TVM runtime only + CUDA torch; check, time, write

The build also exports the shared test cases (``dcgraph.testing``, both plans, batch 1 and 4,
and :data:`dcgraph.testing.GPU_TILE_CASES`) into ``build/fusion_gpu/cases`` for
``tests/backends/test_cuda_run.py`` on the GPU machine.

(``--gpu-mode all``, the default, does both where one machine can.) Rows, forward, fp32 with
TF32 off, each checked against ``dcgraph.reference`` (float64, on the CPU) before timing:

- ``torch_conv``: cuDNN conv alone (the floor); ``torch_plain``: conv + Deep Control as plain
  ops; ``torch_fused``: dcgraph's fused op on CUDA tensors (its eager path: cuDNN conv, then a
  mean and the epilogue); ``inductor``: ``torch.compile`` of the plain ops (Triton), for as
  many blocks as ``--inductor-budget`` seconds of compiling allow;
- ``tvm_unfused``: conv + plain Relax ops, TVM's own fusion, dlight/dcgraph GPU schedules;
  ``tvm_fused``: dcgraph's fused kernels with its default GPU schedule (untuned);
  ``tvm_tuned``: not yet (no CUDA tuning database);
- ONNX Runtime rows: skipped (the GPU machine's onnxruntime is the CPU build).

Times: CUDA events around back-to-back calls for PyTorch, ``time_evaluator`` for TVM
(:mod:`.gpu_runtime`), median of ``--repeats`` samples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import gpu_runtime as gk
from . import harness as H
from .shapes import QUICK, SHAPES, OpShape

ARTIFACTS = Path("build") / "fusion_gpu"
BATCHES = (1, 8)
TVM_KINDS = ("tvm_unfused", "tvm_fused")
GPU_ROWS = ("torch_conv", "torch_plain", "torch_fused", "inductor", "ort_conv", "ort_plain", "ort_function",
            *TVM_KINDS, "tvm_tuned")


def gpu_present() -> bool:
    return torch.cuda.is_available()


def module_name(kind: str, s: OpShape, batch: int) -> str:
    return f"{kind}-{s.name}-b{batch}.so"


def relax_module(kind: str, s: OpShape, batch: int):
    """Inputs ``(x, weight, a, g, b)`` (weights as inputs: the module is shipped, data made there)."""
    from dcgraph.backends.tvm.modules import block_module

    return block_module("fused" if kind == "tvm_fused" else "plain", (batch, s.cin, s.size, s.size),
                        (s.cout, s.cin // s.groups, s.k, s.k), act=s.act, stride=s.stride, padding=s.pad,
                        groups=s.groups)


def case_stems() -> list[tuple[Any, str, str]]:
    """``(case, plan, artifact stem)`` of every shared case (both plans, batch 1 and 4) and GPU
    tile case: what :func:`build` exports for ``tests/backends/test_cuda_run.py``."""
    from dcgraph.testing import BATCHES, CASES, GPU_TILE_CASES, with_batch

    plans = ("hoisted", "two_pass")
    shared = [(with_batch(c, b), plan, f"{c.name}-{plan}-b{b}")
              for c in CASES for plan in plans for b in BATCHES]
    return shared + [(c, plan, f"{c.name}-{plan}-b{c.batch}") for c in GPU_TILE_CASES for plan in plans]


def _export_cases(out: Path, target: Any) -> list[str]:
    from dcgraph.backends.tvm.modules import block_module

    (out / "cases").mkdir(parents=True, exist_ok=True)
    names = []
    for case, plan, stem in case_stems():
        t = case.tensors()
        mod = block_module("fused", tuple(t["x"].shape), tuple(t["weight"].shape), act=case.act,
                           bias=case.bias, plan=plan, **case.conv_kwargs())
        gk.compile_cuda(mod, target).export_library(str(out / "cases" / f"{stem}.so"))
        names.append(f"cases/{stem}.so")
    return names


def _jobs(quick: bool) -> list[tuple[OpShape, int]]:
    shapes = [s for s in SHAPES if not quick or s.name in QUICK]
    return [(s, n) for n in (BATCHES[:1] if quick else BATCHES) for s in shapes]


def build(out: Path = ARTIFACTS, arch: str = "sm_90", quick: bool = False, cases: bool = True) -> dict:
    """Compile every TVM CUDA row (no GPU needed), the shared test cases (``cases``), and pack TVM's
    runtime for the GPU machine."""
    import tvm

    out = Path(out)
    target = gk.cuda_target(arch)
    (out / "mods").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built, failed = [], {}
    for s, batch in _jobs(quick):
        for kind in TVM_KINDS:
            name = module_name(kind, s, batch)
            try:
                gk.compile_cuda(relax_module(kind, s, batch), target).export_library(str(out / "mods" / name))
                built.append(name)
            except Exception as e:  # reported in the run as a failed row
                failed[name] = H.why(e)
        print(f"[gpu build {time.perf_counter() - t0:6.1f}s] {s.name} b{batch}", flush=True)
    case_mods = _export_cases(out, target) if cases else []
    gk.pack_runtime(out)
    wheels = out / "wheels"
    wheels.mkdir(exist_ok=True)
    manifest = {"tvm": tvm.__version__, "arch": arch, "quick": quick, "modules": built, "failed": failed,
                "cases": case_mods,
                "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "seconds": round(time.perf_counter() - t0, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"built {len(built)} CUDA modules ({len(failed)} failed) for {arch} in {manifest['seconds']} s "
          f"into {out}")
    if not list(wheels.glob("*.whl")):
        print(f"no apache-tvm-ffi wheel in {wheels}; for a Python 3.12 GPU machine:\n  "
              + gk.FFI_WHEEL_HELP.format(wheels=wheels))
    return manifest


# ----------------------------------------------------------------------------- run (GPU machine)

def _act(z: torch.Tensor, act: str) -> torch.Tensor:
    F = torch.nn.functional
    return {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "identity": lambda v: v}[act](z)


class _Ctx:
    def __init__(self, art: Path, repeats: int, inductor_budget_s: float, quick: bool) -> None:
        self.art, self.repeats, self.quick = art, repeats, quick
        self.inductor_budget_s, self.inductor_spent_s, self.inductor_done = inductor_budget_s, 0.0, 0
        self.tvm = self.dev = None
        self.tvm_error: str | None = None
        try:
            self.tvm = gk.cuda_runtime()
            self.dev = self.tvm.cuda(0)
        except Exception as e:  # TVM rows fail with the reason; torch rows still run
            self.tvm_error = H.why(e)


def _case(s: OpShape, batch: int, ctx: _Ctx) -> dict:
    from dcgraph import reference as R

    F = torch.nn.functional
    t = s.tensors(batch)
    d = {k: v.double() for k, v in t.items()}
    want = R.conv_deep_control(d["x"], d["weight"], None, d["a"], d["g"], d["b"], s.stride, s.pad,
                               groups=s.groups, act=s.act).numpy()
    conv_want = F.conv2d(d["x"], d["weight"], None, s.stride, s.pad, 1, s.groups).numpy()
    g = {k: v.cuda() for k, v in t.items()}
    x, w, a, gg, b = (g[k] for k in ("x", "weight", "a", "g", "b"))
    col = (1, -1, 1, 1)

    def plain(x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, w, None, s.stride, s.pad, 1, s.groups)
        m = y.mean(dim=(2, 3), keepdim=True)
        return _act(gg.view(col) * (y - a.view(col) * m) + b.view(col), s.act)

    def fused() -> Any:
        from dcgraph import functional as DF

        return lambda: DF.conv_deep_control(x, w, None, a, gg, b, s.stride, s.pad, groups=s.groups, act=s.act)

    def inductor(info: dict) -> Any:
        if ctx.quick and ctx.inductor_done >= 1:
            raise H.Skipped("--quick compiles inductor for 1 block only")
        if ctx.inductor_spent_s >= ctx.inductor_budget_s:
            raise H.Skipped(f"inductor compile budget ({ctx.inductor_budget_s:.0f} s) spent")
        import torch._dynamo

        torch._dynamo.reset()
        comp = torch.compile(plain, dynamic=False, fullgraph=True)
        t0 = time.perf_counter()
        try:
            comp(x)
            torch.cuda.synchronize()
        finally:
            info["compile_s"] = round(time.perf_counter() - t0, 1)
            ctx.inductor_spent_s += time.perf_counter() - t0
            ctx.inductor_done += 1
        return lambda: comp(x)

    infos: dict[str, dict] = {k: {} for k in GPU_ROWS}
    rows: dict[str, dict] = {}
    fns: dict[str, tuple[str, Any]] = {}  # key -> ("torch", fn) | ("tvm", (vm, args))
    builders = {
        "torch_conv": lambda: ("torch", lambda: F.conv2d(x, w, None, s.stride, s.pad, 1, s.groups)),
        "torch_plain": lambda: ("torch", lambda: plain(x)),
        "torch_fused": lambda: ("torch", fused()),
        "inductor": lambda: ("torch", inductor(infos["inductor"])),
    }
    for kind in TVM_KINDS:
        builders[kind] = lambda kind=kind: ("tvm", _tvm_fn(kind, s, batch, t, ctx))
    for key in GPU_ROWS:
        res = rows.setdefault(key, infos[key])
        if key.startswith("ort_"):
            res.update(status=H.SKIPPED, why="ONNX Runtime on the GPU machine is the CPU build")
            continue
        if key == "tvm_tuned":
            res.update(status=H.NOT_YET, why="no CUDA tuning database (dcgraph tune for cuda)")
            continue
        try:
            with torch.no_grad():
                kind, fn = builders[key]()
                got = fn() if kind == "torch" else fn[0]["main"](*fn[1])
                torch.cuda.synchronize()
            got = got.detach().double().cpu().numpy() if kind == "torch" else got.numpy().astype(np.float64)
            err = H.relative_error(got, conv_want if key == "torch_conv" else want)
            res["error"] = err
            if not err < 1e-4:
                res.update(status=H.FAILED, why=f"wrong result: relative error {err:.1e}; not timed")
                continue
            res["status"] = H.OK
            fns[key] = (kind, fn)
        except H.Skipped as e:
            res.update(status=H.SKIPPED, why=str(e))
        except Exception as e:
            res.update(status=H.FAILED, why=H.why(e))
    for _ in range(2):  # two rounds, alternating runtimes, so that clocks settle for every row
        for key, (kind, fn) in fns.items():
            with torch.no_grad():
                samples = (gk.time_torch(fn, max(3, ctx.repeats // 2)) if kind == "torch"
                           else gk.time_tvm(fn[0], fn[1], ctx.dev, max(3, ctx.repeats // 2)))
            rows[key].setdefault("samples", []).extend(samples)
    for key in fns:
        rows[key].update(gk.summary(rows[key].pop("samples")))
    return rows


def _tvm_fn(kind: str, s: OpShape, batch: int, t: dict, ctx: _Ctx):
    if ctx.tvm is None:
        raise RuntimeError(f"TVM CUDA runtime: {ctx.tvm_error}")

    path = ctx.art / "mods" / module_name(kind, s, batch)
    if not path.exists():
        raise FileNotFoundError(f"{path.name} not built (dcgraph bench gpu --gpu-mode build)")
    vm = gk.load_vm(path, ctx.dev)
    args = [ctx.tvm.runtime.tensor(t[n].numpy(), ctx.dev) for n in ("x", "weight", "a", "g", "b")]
    return vm, args


def run(art: Path = ARTIFACTS, quick: bool = False, repeats: int | None = None,
        inductor_budget_s: float = 60.0,
        write: bool = True, command: str = "dcgraph bench gpu") -> dict:
    from . import op_level

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    repeats = repeats or (6 if quick else 10)
    ctx = _Ctx(art, repeats, inductor_budget_s, quick)
    recs: list[dict] = []
    t0 = time.perf_counter()
    partial = H.stem("gpu", quick, "_partial")
    for s, batch in _jobs(quick):
        rows = _case(s, batch, ctx)
        rec = {"layer": s.name, "net": s.net, "batch": batch, "shape": s.describe(),
               "gflop": round(s.flops(batch) / 1e9, 4), "rows": rows}
        rec.update(op_level.ratios(rows))
        recs.append(rec)
        best = f"dcgraph best / floor {rec['dcgraph_vs_floor']:.2f}x" if "dcgraph_vs_floor" in rec else "-"
        print(f"[gpu {time.perf_counter() - t0:6.1f}s] {s.name} b{batch}: {best}", flush=True)
        if write:  # a lease that ends early still brings back what was measured
            H.write_results(partial, {"level": "gpu", "partial": True, "cases": recs}, f"{len(recs)} cases")
    summary = op_level.summarize(recs)
    info = H.machine_info()
    info["versions"] = H.versions()
    info["gpu"] = torch.cuda.get_device_name(0)
    info["cudnn"] = str(torch.backends.cudnn.version())
    if ctx.tvm is not None:
        info["tvm_device"] = str(ctx.dev.device_name)
    manifest = art / "manifest.json"
    if manifest.exists():
        info["built"] = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "modules"}
    head = (f"{info['gpu']} (cuDNN {info['cudnn']}, TF32 off), torch {info['torch']}, TVM runtime "
            f"{info['versions']['tvm']} (dcgraph default GPU schedules, untuned); {info['date']}.")
    md = op_level.markdown(recs, summary, head, repeats, command).replace(
        "Op level:", "GPU op level:", 1).replace("interleaved samples",
                                                 "samples (CUDA events / time_evaluator)")
    data = {"level": "gpu", "quick": quick, "repeats": repeats, "machine": info, "cases": recs,
            "summary": summary, "seconds": round(time.perf_counter() - t0, 1), "command": command}
    if write:
        name = H.stem("gpu", quick)
        H.write_results(name, data, md)
        png = op_level.plot(recs, name)
        data["files"] = [f"{name}.json", f"{name}.md"] + ([png.name] if png else [])
        for suffix in (".json", ".md"):
            (H.results_dir() / (partial + suffix)).unlink(missing_ok=True)
    data["markdown"] = md
    return data


def main_mode(mode: str, quick: bool = False, repeats: int | None = None, command: str = "dcgraph bench gpu",
              art: Path = ARTIFACTS) -> dict | None:
    """``build`` (returns None), ``run`` or ``all``."""
    if mode in ("build", "all"):
        build(art, quick=quick)
    if mode == "build":
        return None
    if not gpu_present():
        raise SystemExit("dcgraph bench gpu: no CUDA GPU here (torch.cuda.is_available() is False): build "
                         "here "
                         "with --gpu-mode build, run benchmarks/gpu_run.sh on a GPU machine")
    return run(art, quick, repeats, command=command)
