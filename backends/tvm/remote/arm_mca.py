"""A second opinion on ARM kernels: llvm-mca's cycles per iteration of a kernel's hot inner loop.

:func:`hottest_loop` finds, in the AArch64 assembly of a library TVM built, the innermost loop (a
backward branch to a label with no other loop inside) with the most vector FMAs: the conv's
micro-kernel. :func:`mca` runs ``llvm-mca`` on its body for a named core and returns cycles per
iteration; with the FMAs per iteration that gives FMAs per cycle against the core's peak.

LLVM 14's llvm-mca (Debian's ``llvm-mca-14``) has no scheduling model of its own for cortex-a72,
cortex-a76 or the Neoverse cores: all of them use the Cortex-A57 model (the same figures, checked),
so :data:`CORES` names what is really modelled: ``cortex-a57`` (out of order, standing in for
A72 / N1 here; one 128-bit FMLA per cycle) and ``cortex-a55`` (in order, the little core).
A static estimate: no cache misses, the loop's branch assumed taken, throughput over many
iterations.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["CORES", "Loop", "hottest_loop", "mca", "mca_tool"]

#: core -> what llvm-mca models it as (see the module doc)
CORES = {"cortex-a57": "out of order (the model LLVM 14 uses for A72, A76, N1)", "cortex-a55": "in order"}
#: the FMA share of a loop that counts as a micro-kernel (see :func:`hottest_loop`)
DENSE = 0.4
_LABEL = re.compile(r"^([.\w$]+):")
_BRANCH = re.compile(r"^\s*(?:b(?:\.\w+)?|cbn?z\s+\w+,|tbn?z\s+\w+,\s*#\d+,)\s*([.\w$]+)\s*$")


@dataclass(frozen=True)
class Loop:
    label: str
    body: tuple[str, ...]  #: the instructions, directives and comments left out

    @property
    def fmas(self) -> int:
        return sum(1 for ln in self.body if ln.split()[0] in ("fmla", "fmls"))


def _instructions(lines: list[str]) -> tuple[str, ...]:
    out = []
    for ln in lines:
        text = ln.split("//")[0].strip()
        if text and not text.startswith(".") and not _LABEL.match(text):
            out.append(text)
    return tuple(out)


def loops(asm: str) -> list[Loop]:
    """The innermost loops of ``asm`` (AArch64, GNU syntax as LLVM prints it)."""
    lines = asm.splitlines()
    labels: dict[str, int] = {}
    spans = []
    for i, ln in enumerate(lines):
        m = _LABEL.match(ln.strip())
        if m:
            labels[m.group(1)] = i
            continue
        b = _BRANCH.match(ln)
        if b and b.group(1) in labels:  # a backward branch: a loop from its label to here
            spans.append((labels[b.group(1)], i, b.group(1)))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [Loop(label, _instructions(lines[a + 1:b + 1])) for a, b, label in inner]


_FUNCTION = re.compile(r"^\s*\.type\s+([.\w$]+),\s*@function")


def functions(asm: str) -> dict[str, str]:
    """The assembly of each function, a parallel loop's body (``.L__tvm_parallel_lambda*``, which
    LLVM emits after the kernel that launches it) counted with that kernel."""
    out: dict[str, list[str]] = {}
    name = ""
    for ln in asm.splitlines():
        m = _FUNCTION.match(ln)
        if m and "parallel_lambda" not in m.group(1):
            name = m.group(1)
        out.setdefault(name, []).append(ln)
    return {k: "\n".join(v) for k, v in out.items()}


def hottest_loop(asm: str, kernels: tuple[str, ...] = ()) -> Loop | None:
    """The innermost loop with the most vector FMAs (the longest of those, if tied) in the
    functions whose name contains one of ``kernels`` (all of ``asm`` if none does), among the loops
    where FMAs are at least :data:`DENSE` of the instructions if there are any (a fused silu's
    polynomial, in an epilogue loop, has many FMAs too); None if no loop has one."""
    if kernels:
        picked = [text for name, text in functions(asm).items() if any(k in name for k in kernels)]
        asm = "\n".join(picked) or asm
    found = [lp for lp in loops(asm) if lp.fmas]
    if not found:
        return None
    return max(found, key=lambda lp: (lp.fmas >= DENSE * len(lp.body), lp.fmas, len(lp.body)))


def mca_tool() -> str | None:
    """The llvm-mca binary (``llvm-mca`` or a versioned ``llvm-mca-NN``), or None."""
    for name in ("llvm-mca", *(f"llvm-mca-{v}" for v in range(20, 11, -1))):
        if path := shutil.which(name):
            return path
    return None


def mca(loop: Loop, core: str = "cortex-a57", iterations: int = 200) -> dict[str, float]:
    """llvm-mca on ``loop``'s body for ``core``: ``cycles_per_iteration``, ``ipc``,
    ``fmas_per_cycle``. Raises ``RuntimeError`` if llvm-mca is missing or fails."""
    tool = mca_tool()
    if tool is None:
        raise RuntimeError("llvm-mca is not installed (apt-get install llvm-14)")
    res = subprocess.run([tool, "-mtriple=aarch64-linux-gnu", f"-mcpu={core}", f"-iterations={iterations}"],
                         input="\n".join(loop.body) + "\n", capture_output=True, text=True, timeout=120)
    fields = dict(re.findall(r"^(Total Cycles|IPC|Iterations):\s+([\d.]+)", res.stdout, re.M))
    if res.returncode != 0 or "Total Cycles" not in fields:
        raise RuntimeError(f"llvm-mca failed for {core}: {(res.stderr or res.stdout).strip()[:300]}")
    per_iter = float(fields["Total Cycles"]) / float(fields["Iterations"])
    return {"cycles_per_iteration": per_iter, "ipc": float(fields["IPC"]),
            "fmas_per_cycle": loop.fmas / per_iter}
