"""Compilation targets: the named presets (``x86``, ``arm``, ``cuda``) and any TVM target.

TVM 0.27 takes targets as dicts (``{"kind": "llvm", "mcpu": ...}``), tags
(``"nvidia/nvidia-h100"``) or Target objects; it rejects the old CLI strings. dcgraph
accepts all of these, plus CLI strings (``"llvm -mcpu=znver3 -num-cores=2"``, translated),
plus a JSON dict in a string, and says in one line what is wrong with anything else.

``mcpu`` matters: on x86 the same tuned schedule ran 2.0 ms with the host's ``mcpu`` and
41 ms without (see the TVM notes), so the ``x86`` preset asks LLVM for the host CPU.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import tvm

from .errors import TargetError

# aarch64 with NEON, as in a Raspberry Pi 4 / AWS Graviton 1 (cortex-a72); cross-compiled here.
ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a72"}
# Hopper by default; "cuda-sm80" for Ampere. The thread/shared-memory limits let dlight and
# MetaSchedule size their blocks (TVM's nvidia/* tags carry the same fields).
CUDA = {"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 1024, "max_num_threads": 1024,
        "thread_warp_size": 32, "max_shared_memory_per_block": 49152, "registers_per_block": 65536}
PRESETS = ("x86", "arm", "cuda", "cuda-sm80")

__all__ = ["ARM", "CUDA", "PRESETS", "TargetError", "describe", "host_cpu", "is_arm", "is_gpu", "resolve",
           "runs_here", "x86"]


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (``znver3``, ``skylake-avx512``, ...)."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def x86(num_cores: int | None = None) -> dict[str, Any]:
    """The host x86 CPU, every core unless told otherwise."""
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": num_cores or os.cpu_count() or 1}


def _from_cli_string(text: str) -> dict[str, Any]:
    """``"llvm -mcpu=znver3 -mattr=+avx2,+fma"`` -> ``{"kind": "llvm", "mcpu": "znver3", ...}``."""
    kind, *flags = text.split()
    spec: dict[str, Any] = {"kind": kind}
    for flag in flags:
        key, eq, value = flag.lstrip("-").partition("=")
        if not eq:
            raise TargetError(f"cannot read target flag {flag!r} in {text!r}: expected -key=value")
        spec[key] = value.split(",") if key in ("mattr", "keys", "libs") else value
    return spec


def resolve(target: str | dict | tvm.target.Target | None = None) -> tvm.target.Target:
    """A TVM Target for a preset name, dict, JSON string, tag, CLI-style string or Target (None: x86)."""
    if isinstance(target, tvm.target.Target):
        return target
    spec: Any = target
    if target is None or target == "x86":
        spec = x86()
    elif target == "arm":
        spec = dict(ARM)
    elif target == "cuda":
        spec = dict(CUDA)
    elif target == "cuda-sm80":
        spec = {**CUDA, "arch": "sm_80"}
    elif isinstance(target, str):
        text = target.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as err:
                raise TargetError(f"target {text!r} is not valid JSON: {err}") from None
        elif " " in text or text in ("llvm", "c"):
            spec = _from_cli_string(text)
            if spec["kind"] == "llvm" and "mcpu" not in spec and "mtriple" not in spec:
                spec["mcpu"] = host_cpu()
    try:
        return tvm.target.Target(spec)
    except Exception as err:  # TVM raises ValueError / TVMError with long messages
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TargetError(f"unknown target {target!r} ({first}); use one of {', '.join(PRESETS)}, "
                          'a dict like {"kind": "llvm", "mcpu": "..."} or a TVM tag') from None


def is_gpu(target: tvm.target.Target) -> bool:
    return "gpu" in list(target.keys)


def is_arm(target: tvm.target.Target) -> bool:
    triple = str(target.attrs.get("mtriple", "")) if target.kind.name == "llvm" else ""
    return triple.startswith(("aarch64", "arm"))


def runs_here(target: tvm.target.Target) -> bool:
    """True if code for ``target`` runs on this machine (CPU of the same architecture, or CUDA with a GPU)."""
    if target.kind.name == "cuda":
        return bool(tvm.cuda(0).exist)
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", ""))
    return not triple or triple.split("-")[0] == platform.machine()


def describe(target: tvm.target.Target) -> str:
    """One short line: ``llvm znver3 (x86_64, 2 cores)``, ``llvm cortex-a72 aarch64``, ``cuda sm_90``."""
    attrs = target.attrs
    if target.kind.name == "cuda":
        return f"cuda {attrs.get('arch', '')}".strip()
    parts = [target.kind.name, str(attrs.get("mcpu", "")), str(attrs.get("mtriple", ""))]
    return " ".join(p for p in parts if p)
