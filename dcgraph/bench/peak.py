"""How far each kernel is from this machine's fp32 peak: the peak measured, and the op level's
GFLOP/s table against it.

The peak is *measured*, not looked up: a C loop of independent vector FMA chains (GCC vector
extensions, ``-O2 -march=native``, one OpenMP thread per core the benchmark uses), compiled with
the machine's C compiler at run time, best of three runs. Peak = threads x lanes x 2 (an FMA is
two flops) x FMAs per cycle x clock; the loop reaches it when the chains hide the FMA latency
(12 chains: latency 4-5 cycles x 2 FMA pipes). The clock in ``/proc/cpuinfo`` is reported beside
it, beside the clock the measured figure implies with two FMA pipes per core (a VM states its
nominal clock; the loop runs at the turbo clock, as the kernels do).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CHAINS = 12
_SOURCE = r"""
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
typedef float vf __attribute__((vector_size(LANES * 4)));
int main(int argc, char **argv) {
    long iters = atol(argv[1]);
    double best = 0.0;
    float sink = 0.0f;
    for (int rep = 0; rep < 5; ++rep) {
        double t0 = omp_get_wtime();
        #pragma omp parallel reduction(+ : sink)
        {
            vf acc[CHAINS];
            vf x = (vf){0} + 1.0000001f, y = (vf){0} + 1e-7f;
            for (int c = 0; c < CHAINS; ++c) acc[c] = (vf){0} + (float)(c + omp_get_thread_num());
            for (long i = 0; i < iters; ++i) {
                #pragma GCC unroll 16
                for (int c = 0; c < CHAINS; ++c) acc[c] = acc[c] * x + y;
            }
            for (int c = 0; c < CHAINS; ++c)
                for (int l = 0; l < LANES; ++l) sink += acc[c][l];
        }
        double seconds = omp_get_wtime() - t0;
        double gflops = 2.0 * LANES * CHAINS * (double)iters * omp_get_max_threads() / seconds / 1e9;
        if (gflops > best) best = gflops;
    }
    printf("%.3f %g\n", best, (double)sink);
    return 0;
}
"""


def cpu_mhz() -> float | None:
    """The clock ``/proc/cpuinfo`` states (a VM reports its nominal clock, not turbo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


def measure(threads: int, lanes: int, iters: int = 100_000_000) -> dict:
    """The measured fp32 peak in GFLOP/s for ``threads`` threads of ``lanes``-wide vectors, with
    how it was got; ``{"gflops": None, "why": ...}`` where no C compiler is found."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return {"gflops": None, "why": "no C compiler to build the FMA loop"}
    with tempfile.TemporaryDirectory(prefix="dcgraph-peak-") as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(_SOURCE)
        build = subprocess.run([cc, "-O2", "-march=native", "-ffp-contract=fast", "-fopenmp",
                                f"-DLANES={lanes}", f"-DCHAINS={CHAINS}", str(src), "-o", str(exe)],
                               capture_output=True, text=True, check=False, timeout=120)
        if build.returncode != 0:
            return {"gflops": None, "why": f"the FMA loop did not build: {build.stderr.strip()[-200:]}"}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "true"}
        res = subprocess.run([str(exe), str(iters)], capture_output=True, text=True, env=env, check=False,
                             timeout=120)
    if res.returncode != 0:
        return {"gflops": None, "why": f"the FMA loop failed: {res.stderr.strip()[-200:]}"}
    gflops = float(res.stdout.split()[0])
    mhz = cpu_mhz()
    out = {"gflops": gflops, "threads": threads, "lanes": lanes, "chains": CHAINS, "cpu_mhz": mhz,
           "how": f"measured: {threads} threads x {CHAINS} independent {lanes}-lane FMA chains "
                  f"(cc -O2 -march=native), best of 5"}
    # what clock the figure implies with two FMA pipes per core (every recent x86 core has two)
    out["implied_ghz_at_2_fma"] = round(gflops / (threads * lanes * 2 * 2), 2)
    return out


def describe(peak: dict) -> str:
    """One line for a results header."""
    if not peak.get("gflops"):
        return f"fp32 peak: not measured ({peak.get('why', '?')})."
    stated = f"; /proc/cpuinfo states {peak['cpu_mhz']:.0f} MHz" if peak.get("cpu_mhz") else ""
    return (f"fp32 peak {peak['gflops']:.1f} GFLOP/s ({peak['how']}; = {peak['threads']} cores x 2 FMA "
            f"pipes x {peak['lanes']} lanes x 2 flops x {peak['implied_ghz_at_2_fma']:.2f} GHz{stated}).")


def kernel_table(recs: list[dict], labels: dict[str, str], keys: list[str], peak: dict) -> list[str]:
    """Markdown: per block and batch, each of ``keys``'s rows in GFLOP/s (the conv's flops over its
    median time) and as a share of ``peak``; the GFLOP/s go into each row's record too."""
    top = peak.get("gflops")
    lines = ["", f"Per kernel: the conv's GFLOP/s over each row's median time, and its share of the "
             f"machine's {describe(peak)} The flops are the direct conv's (2 x MACs): a kernel doing "
             "fewer operations (dcgraph's Winograd F(m, 3) for 3x3 stride-1 convs: 2.25x or 4x fewer "
             "multiplies) reads as the direct-conv-equivalent rate and can pass 100%.", "",
             "| layer | batch | GFLOP | " + " | ".join(labels[k] for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for r in recs:
        cells = []
        for k in keys:
            row = r["rows"].get(k, {})
            if not row.get("median_ms"):
                cells.append("-")
                continue
            row["gflops"] = r["gflop"] / (row["median_ms"] / 1e3)
            share = f" ({100 * row['gflops'] / top:.0f}%)" if top else ""
            cells.append(f"{row['gflops']:.1f}{share}")
        lines.append(f"| {r['layer']} | {r['batch']} | {r['gflop']:.3f} | " + " | ".join(cells) + " |")
    return lines
