"""The main job (``make run``): rewrite a built-in model, then train with Deep Control.

1. *Rewrite*: the built-in ResNet-18-like BatchNorm model (ResNet-18's widths) is exported,
   its 20 conv + BN (+ relu) blocks converted to Deep Control (``preserve`` init, exact) and fused into the
   ``dcgraph::conv_deep_control`` op; the result is checked against the original in float64
   and float32. The rewritten program is then compiled through TVM for this CPU (dcgraph's
   fused kernels, default schedules), checked against the original, and all three (PyTorch
   BatchNorm, PyTorch fused, TVM fused) are timed at inference.
2. *Train*: the same network (:class:`dcgraph.zoo.DCNet`) is built with fused Deep Control
   blocks, with Deep Control as plain ops (same weights), and with BatchNorm. Fused and plain
   must agree (outputs and every gradient); a training step of each is timed (median of
   interleaved repeats) and the bytes autograd saves are counted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dcgraph import zoo
from dcgraph.compare import relative_error
from dcgraph.memory import SavedBytes, saved_bytes

#: the compiled model must match the original to this relative error (float32 through ~20 layers)
TVM_RTOL = 1e-4


@dataclass
class VariantResult:
    name: str
    step_ms: float
    saved: SavedBytes


def _plain_name(name: str) -> str:
    """The fused net's name for a parameter of the plain net (``features.3.0.weight`` ->
    ``features.3.weight``, ``features.3.1.a`` -> ``features.3.a``)."""
    parts = name.split(".")
    if parts[0] == "features":
        del parts[2]
    return ".".join(parts)


def _copy_dc_weights(fused: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Give ``plain`` (Conv2d + DeepControl2d blocks) the parameters of ``fused``."""
    src = dict(fused.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(src[_plain_name(name)])


def build_variants(seed: int = 0, **net_kwargs) -> dict[str, torch.nn.Module]:
    """The demo network in its three variants; fused and plain share their weights."""
    torch.manual_seed(seed)
    nets = {name: zoo.dcnet(name, **net_kwargs) for name in zoo.BLOCKS}
    _copy_dc_weights(nets["fused"], nets["plain"])
    return nets


def _loss(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against fixed labels: gradients of a realistic size."""
    labels = torch.arange(out.shape[0]) % out.shape[1]
    return torch.nn.functional.cross_entropy(out, labels)


def check_agreement(fused: torch.nn.Module, plain: torch.nn.Module, x: torch.Tensor,
                    rtol: float = 1e-4) -> float:
    """Worst relative difference (max |diff| / max |plain|) over the output and every
    gradient; raises if it exceeds ``rtol``."""
    results = []
    for net in (fused, plain):
        net.zero_grad(set_to_none=True)
        out = net(x)
        _loss(out).backward()
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}))
    (out_f, grads_f), (out_p, grads_p) = results
    pairs = [("output", out_f, out_p)]
    pairs += [(n, grads_f[_plain_name(n)], g) for n, g in grads_p.items()]
    worst = 0.0
    for name, ours, ref in pairs:
        rel = relative_error(ours, ref)
        if not rel <= rtol:  # NaN and infinity give inf: never "agree"
            raise AssertionError(f"fused and plain-ops Deep Control disagree on {name}: "
                                 f"relative difference {rel:.2e} > {rtol:.0e}")
        worst = max(worst, rel)
    return worst


def run(batch: int = 8, size: int = 64, repeats: int = 10, threads: int = 2,
        seed: int = 0, progress: bool = True) -> tuple[list[VariantResult], float]:
    """Time and measure a training step of each variant; returns results and the agreement."""
    torch.set_num_threads(threads)
    nets = build_variants(seed)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    agreement = check_agreement(nets["fused"], nets["plain"], x)

    def step(net: torch.nn.Module) -> None:
        net.zero_grad(set_to_none=True)
        _loss(net(x)).backward()

    times: dict[str, list[float]] = {name: [] for name in nets}
    for net in nets.values():  # warm-up
        step(net)
    for _ in tqdm(range(repeats), desc="timing training steps", disable=not progress,
                  leave=False):
        for name, net in nets.items():  # interleaved, so drift hits all variants alike
            t0 = time.perf_counter()
            step(net)
            times[name].append(time.perf_counter() - t0)
    results = []
    for name, net in nets.items():
        mem = saved_bytes(lambda net=net: net(x), inputs=[x], modules=[net])
        results.append(VariantResult(name, 1e3 * statistics.median(times[name]), mem))
    return results, agreement


def rewrite_section(batch: int = 8, repeats: int = 10, seed: int = 0, width: int = 64,
                    size: int = 112, compile_tvm: bool = True) -> str:
    """Convert + fuse the ResNet-18-like model, verify, time inference; then (``compile_tvm``)
    compile the rewritten program through TVM for this CPU, verify and time it; a text report."""
    from dcgraph.passes.pipeline import convert_model

    model = zoo.randomize_norm_stats(zoo.resnet18_like(width=width)).eval()
    shape = (1, 3, size, size)
    example = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(seed))
    result = convert_model(model, example)
    rewritten = result.program.module()
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(seed + 1))
    compiled = None
    if compile_tvm:
        from dcgraph.backends import tvm as dtvm

        t0 = time.perf_counter()
        compiled = dtvm.compile(result.program, "x86", x)
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            tvm_error = relative_error(compiled(x), model(x))
        if not tvm_error <= TVM_RTOL:  # NaN and infinity give inf
            from dcgraph.passes.verify import VerificationError

            raise VerificationError(f"the TVM-compiled model differs from the original: relative error "
                                    f"{tvm_error:.1e} > {TVM_RTOL:.0e}")
    with torch.no_grad():
        times = {"BatchNorm (original), PyTorch": [], "Deep Control, fused, PyTorch": []}
        fns = dict(zip(times, (model, rewritten), strict=True))
        if compiled is not None:
            times["Deep Control, fused, TVM"] = []
            fns["Deep Control, fused, TVM"] = lambda: compiled(x)
        calls = {k: (fn if k.endswith("TVM") else (lambda fn=fn: fn(x))) for k, fn in fns.items()}
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
    lines = [
        f"== Rewrite: ResNet-18-like (BatchNorm, widths {width}..{8 * width}), input "
        f"{shape[1]}x{shape[2]}x{shape[3]} ==",
        result.report.summary(),
        f"verified against the original: relative error {result.float64_error:.1e} (float64), "
        f"{result.float32_error:.1e} (float32)",
    ]
    if compiled is not None:
        lines += [
            f"compiled through TVM for {compiled.summary()} in {compile_s:.1f} s",
            f"verified TVM against the original PyTorch model: relative error {tvm_error:.1e} (float32, "
            f"<= {TVM_RTOL:.0e})",
        ]
    lines.append(f"inference, batch {batch}, median of {repeats} interleaved runs:")
    base = statistics.median(times["BatchNorm (original), PyTorch"])
    for name, ts in times.items():
        lines.append(f"  {name:<34}{statistics.median(ts):8.2f} ms  {statistics.median(ts) / base:5.2f}x")
    return "\n".join(lines)


def report(results: list[VariantResult], agreement: float, batch: int, size: int) -> str:
    """A plain-text table with ratios against the fused variant."""
    by = {r.name: r for r in results}
    fused = by["fused"]
    lines = [
        f"== Train: DCNet (6 conv blocks), input {batch}x3x{size}x{size}, "
        f"{torch.get_num_threads()} threads, one training step (forward + backward) ==",
        f"fused vs plain ops: outputs and all gradients agree (worst relative difference "
        f"{agreement:.1e})",
        "",
        f"{'variant':<28}{'step ms':>10}{'saved MiB':>12}{'vs fused (time)':>18}{'vs fused (mem)':>17}",
    ]
    labels = {"fused": "Deep Control, fused op", "plain": "Deep Control, plain ops",
              "batchnorm": "BatchNorm"}
    for r in results:
        lines.append(
            f"{labels[r.name]:<28}{r.step_ms:>10.2f}{r.saved.activations / 2**20:>12.2f}"
            f"{r.step_ms / fused.step_ms:>17.2f}x{r.saved.activations / fused.saved.activations:>16.2f}x")
    plain, bn = by["plain"], by["batchnorm"]
    lines += [
        "",
        f"The fused op saves {1 - fused.saved.activations / plain.saved.activations:.0%} of the "
        f"activation memory of plain-ops Deep Control and "
        f"{1 - fused.saved.activations / bn.saved.activations:.0%} of BatchNorm's; its step "
        f"takes {fused.step_ms / plain.step_ms:.2f}x the plain-ops time and "
        f"{fused.step_ms / bn.step_ms:.2f}x BatchNorm's.",
    ]
    return "\n".join(lines)
