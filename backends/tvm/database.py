"""Tuning databases: one MetaSchedule JSON database per target, under a tuning directory.

``DIR/<target key>/`` holds the records of one target (``dcgraph tune`` writes them, ``compile``
applies them). One database per target because MetaSchedule's look-ups do not filter by target
(an x86 record was returned for an ARM target). :func:`open_database` also repairs the one
damage a kill can do: a last line cut short while it was being written.

Next to MetaSchedule's two files, ``choices.json`` says, per kernel (workload), which schedule
``tune`` confirmed: the default or one record, picked by re-measuring the best candidates
interleaved with the default (:mod:`.tuning.confirm`). A record's stored time is one noisy
measurement, so the fastest stored time is not trusted alone. :func:`applied_database` is what
``compile`` applies: the confirmed choice of every kernel that has one (nothing for a kernel
whose default won), MetaSchedule's fastest record for the others.
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
CHOICES = "choices.json"

__all__ = ["CHOICES", "DB_FILES", "applied_database", "database_dir", "fingerprint", "open_database",
           "read_choices", "target_key", "workload_key", "write_choice"]


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
    directory = locate(path, target, create=create)
    directory.mkdir(parents=True, exist_ok=True)
    _repair(directory)
    return ms.database.JSONDatabase(work_dir=str(directory), allow_missing=create)


def locate(path: str | os.PathLike, target: Any, *, create: bool = False) -> Path:
    """The database directory for ``target`` under ``path`` (see :func:`open_database`)."""
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
    return directory


def fingerprint(record: Any) -> str:
    """A tuning record's trace (its steps and decisions) as a short hash: equal for the same schedule.

    The trace is taken after a JSON round trip (``TuningRecord.from_json`` replays it on the
    workload), the form every record read back from disk has: a trace still in memory from the
    search can serialise differently from its own replay (seen on one kernel in two tuning runs
    on the Intel machines), which made ``choices.json`` name a trace that compile never found.
    A bare trace (no record) is hashed as it is. Records read back from disk take the round trip
    too: hashing their traces directly made the same test flake again."""
    import hashlib

    trace = record
    if hasattr(record, "workload") and hasattr(record, "trace"):
        trace = ms.database.TuningRecord.from_json(record.as_json(), record.workload).trace
    return hashlib.sha1(json.dumps(trace.as_json(), default=str).encode()).hexdigest()[:20]


def workload_key(mod: tvm.IRModule) -> str:
    """A kernel's key in ``choices.json``: its structural hash."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def read_choices(directory: str | os.PathLike) -> dict[str, dict]:
    """``choices.json`` of a database directory: ``{workload key: entry}`` (empty if none)."""
    path = Path(directory) / CHOICES
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is damaged; the fastest stored records are applied instead", path)
        return {}


def write_choice(directory: str | os.PathLike, key: str, entry: dict) -> None:
    """Set one kernel's choice (written whole to a temporary file, then renamed: never half-written)."""
    choices = read_choices(directory)
    choices[key] = entry
    path = Path(directory) / CHOICES
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(choices, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def applied_database(path: str | os.PathLike, target: Any) -> ms.database.Database:
    """What ``compile`` applies from a tuning directory: per kernel the record ``choices.json``
    names (none where the default won), else MetaSchedule's fastest valid record."""
    directory = locate(path, target)
    database = open_database(path, target)
    choices = read_choices(directory)
    if not choices:
        return database
    chosen = ms.database.MemoryDatabase()
    by_key: dict[str, list] = {}
    for rec in database.get_all_tuning_records():
        by_key.setdefault(workload_key(rec.workload.mod), []).append(rec)
    for key, recs in by_key.items():
        entry = choices.get(key)
        if entry is None:
            top = database.get_top_k(recs[0].workload, 1)
            pick = top[0] if top else None
        elif entry.get("choice") == "tuned":
            pick = next((r for r in recs if fingerprint(r) == entry.get("trace")), None)
        else:
            pick = None
        if pick is not None:
            workload = chosen.commit_workload(pick.workload.mod)
            chosen.commit_tuning_record(ms.database.TuningRecord(
                pick.trace, workload, pick.run_secs, pick.target, pick.args_info))
    return chosen
