"""Tuning databases: one MetaSchedule JSON database per target, under a tuning directory.

``DIR/<target key>/`` holds the records of one target (``dcgraph tune`` writes them, ``compile``
applies them). One database per target because MetaSchedule's look-ups do not filter by target
(an x86 record was returned for an ARM target). :func:`open_database` also repairs the one
damage a kill can do: a last line cut short while it was being written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from . import targets as targets_
from .errors import CompileError, TuneError

log = logging.getLogger(__name__)

DB_FILES = ("database_workload.json", "database_tuning_record.json")

__all__ = ["DB_FILES", "database_dir", "open_database", "target_key"]


def target_key(target: Any) -> str:
    """The database directory name for ``target``: kind, architecture, CPU (or GPU arch), features.

    ``llvm-x86_64-znver3``, ``llvm-aarch64-cortex-a72-neon``, ``cuda-sm_90``. ``num-cores`` is not
    part of it: records apply to the same CPU with any core count (their speed may differ).
    """
    t = targets_.resolve(target)
    attrs = t.attrs
    parts = [t.kind.name]
    if t.kind.name == "llvm":
        triple = str(attrs.get("mtriple", "")) or str(tvm.target.codegen.llvm_get_system_triple())
        parts += [triple.split("-")[0], str(attrs.get("mcpu", "")) or "generic"]
        mattr = sorted(str(a).lstrip("+") for a in attrs.get("mattr", []) or [])
        if mattr:
            parts.append("+".join(mattr))
    elif t.kind.name == "cuda":
        parts.append(str(attrs.get("arch", "")) or "sm")
    else:
        parts.append(str(attrs.get("mcpu", "")))
    text = "-".join(p for p in parts if p)
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in text)


def database_dir(db: str | os.PathLike, target: Any) -> Path:
    """``db/<target_key(target)>``: where ``tune`` keeps the records for ``target``."""
    return Path(db) / target_key(target)


def _repair(directory: Path) -> list[str]:
    """Drop a last line cut short by a kill from the database files; fail on damage elsewhere."""
    notes = []
    for name in DB_FILES:
        path = directory / name
        if not path.is_file():
            continue
        text = path.read_text()
        lines = text.splitlines()
        good = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    notes.append(f"{path}: dropped a truncated last line (a run was killed while writing)")
                    break
                raise TuneError(f"{path}: line {i + 1} is not JSON; the database is damaged") from None
            good.append(line)
        else:
            if text.endswith("\n") or not text:
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in good))
        os.replace(tmp, path)
    for note in notes:
        log.warning(note)
    return notes


def open_database(path: str | os.PathLike, target: Any, *, create: bool = False) -> ms.database.JSONDatabase:
    """The JSON database for ``target`` under ``path``.

    ``path`` is a tuning directory written by ``tune`` (the ``<target key>`` sub-directory
    is used) or one MetaSchedule JSON database directory (used as is). ``create``: make the
    target's sub-database if it is missing (tuning); otherwise a missing one is a
    :class:`CompileError`.
    """
    path = Path(path)
    if (path / DB_FILES[0]).is_file():
        directory = path
    else:
        directory = database_dir(path, target)
        if not (directory / DB_FILES[0]).is_file() and not create:
            have = sorted(p.name for p in path.iterdir() if (p / DB_FILES[0]).is_file()) \
                if path.is_dir() else []
            raise CompileError(
                f"no tuning records for {targets_.describe(targets_.resolve(target))} in {path} "
                f"(expected {directory.name}/; " + (f"it has {', '.join(have)})" if have else "it has none)")
                + "; run dcgraph tune first")
    directory.mkdir(parents=True, exist_ok=True)
    _repair(directory)
    return ms.database.JSONDatabase(work_dir=str(directory), allow_missing=create)
