"""Tuning records that ship with dcgraph, per CPU family, applied by ``compile`` when the target
matches (as TVM's TopHub once did for AutoTVM).

``records/<family>/`` holds one tuning database (MetaSchedule's two JSON files and the confirmed
``choices.json``, :mod:`.database`) and ``SOURCE.json`` (the machine it was tuned on, when, with
what command). Families: ``x86_64-avx512``, ``x86_64-avx2``, ``aarch64-neon`` (:func:`family`),
the vector width being what shapes a blocked kernel (its channel block), so a record of one
family never matches another's kernels. Within a family the records were measured on one CPU:
on another CPU of the family they are still correct (a record is a schedule, replayed), and
usually, not always, faster than the defaults.

``benchmarks/ship_records.py`` writes them (the built-in zoo at the sizes the benchmarks and
``make run`` use). ``compile(..., shipped=False)`` leaves them out; a ``database`` given to
``compile`` is used instead of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import targets as targets_
from .database import DB_FILES

__all__ = ["RECORDS", "family", "shipped_records", "source"]

RECORDS = Path(__file__).resolve().parent / "records"


def family(target: Any) -> str | None:
    """The records family of a CPU target: architecture and vector unit; None for other targets."""
    from .schedules import vector_lanes

    tgt = targets_.resolve(target)
    if tgt.kind.name != "llvm":
        return None
    if targets_.is_arm(tgt):
        return "aarch64-neon"
    lanes = vector_lanes(tgt)
    return {16: "x86_64-avx512", 8: "x86_64-avx2"}.get(lanes)


def shipped_records(target: Any) -> Path | None:
    """The shipped database directory for ``target``'s family, or None if dcgraph has none."""
    name = family(target)
    if name is None:
        return None
    directory = RECORDS / name
    return directory if (directory / DB_FILES[0]).is_file() else None


def source(directory: Path) -> str:
    """One line: where a shipped database came from (its ``SOURCE.json``)."""
    try:
        info = json.loads((directory / "SOURCE.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"dcgraph's shipped {directory.name} records"
    return (f"dcgraph's shipped {directory.name} records (tuned on {info.get('cpu', '?')}, "
            f"{info.get('date', '?')})")
