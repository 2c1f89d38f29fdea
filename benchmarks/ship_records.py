"""Tune the built-in zoo and ship the records with dcgraph (``backends/tvm/records/<family>/``).

The models and sizes are the ones the model level (``dcgraph bench model``) and ``make run``
use: ResNet-18-like (width 64), MobileNetV2-like and EfficientNet-B0-like (width 16) at 224 px,
batch 1 and 8, and the demo's ResNet-18-like at 112 px, batch 8, converted to Deep Control with
the mean path live (the same kernels as a converted model with ``a = 0``: ``a`` is an input of
the kernels). Their kernels' knob spaces are measured whole (``dcgraph.backends.tvm.tuning``,
every candidate checked, the best confirmed against the default, interleaved); kernels without
knobs keep their default schedules. Structurally equal kernels are tuned once, so a torchvision
or pytorchcv ResNet-18 at 224 px finds its convolutions here too.

The family (``x86_64-avx2``, ``x86_64-avx512``, ``aarch64-neon``) is this machine's; a run adds to
the family's records (resumes: what is measured is kept in the scratch directory). Only the
confirmed records are shipped, with their kernels and ``choices.json``. ``SOURCE.json`` says where they came
from; ``compile`` names it in ``summary()``.

    python benchmarks/ship_records.py [--configs resnet18:224:1 ...] [--minutes M] [--scratch DIR]
    python benchmarks/ship_records.py --retile   # after a change of schedules.common.TILE_SCOPE
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
import warnings

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import torch
from tvm.s_tir import meta_schedule as ms

from dcgraph import zoo
from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.database import CHOICES, applied_database, database_dir, read_choices
from dcgraph.backends.tvm.frontends import prepare
from dcgraph.backends.tvm.pipeline import fuse
from dcgraph.backends.tvm.shipped import RECORDS, family
from dcgraph.backends.tvm.tuning import extract_tasks, tune
from dcgraph.backends.tvm.tuning.knob_search import space_size
from dcgraph.backends.tvm.tuning.tools import tuning_target
from dcgraph.bench.common import machine_info
from dcgraph.bench.model_level import MODELS, model_spec
from dcgraph.testing import live_mean

#: model:size:batch:width (width 0: the model level's default for the model)
CONFIGS = ["resnet18:224:1:0", "mobilenet_v2:224:1:0", "efficientnet:224:1:0",
           "resnet18:112:8:64", "resnet18:224:8:0", "mobilenet_v2:224:8:0", "efficientnet:224:8:0"]


def model_for(name: str, width: int) -> torch.nn.Module:
    """The model level's Deep Control model (converted, the mean path live)."""
    from dcgraph.passes.fx import rewrite

    torch.manual_seed(0)
    width = width or model_spec(name)[1]
    bn = zoo.randomize_norm_stats(MODELS[name][0](width=width)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewrite(bn)
        return live_mean(bn)


def retile(directory: str | os.PathLike) -> int:
    """Rewrite the register tiles' storage scope in a database's records (``CacheWrite`` and
    ``SetScope`` steps) to :data:`dcgraph.backends.tvm.schedules.common.TILE_SCOPE`, and the trace
    fingerprints ``choices.json`` names to match: the same decisions, the tiles where the default
    schedules now put them. Returns the records changed."""
    from pathlib import Path

    from dcgraph.backends.tvm.database import fingerprint
    from dcgraph.backends.tvm.schedules.common import TILE_SCOPE

    directory = Path(directory)
    workloads = [ms.database.Workload.from_json(json.loads(ln))
                 for ln in (directory / "database_workload.json").read_text().splitlines() if ln.strip()]
    lines = [json.loads(ln) for ln in (directory / "database_tuning_record.json").read_text().splitlines()
             if ln.strip()]
    renamed, changed = {}, 0
    for rec in lines:
        before = fingerprint(ms.database.TuningRecord.from_json(rec[1], workloads[rec[0]]).trace)
        steps = [st for st in rec[1][0][0] if st[0] in ("CacheWrite", "SetScope") and st[2][-1] != TILE_SCOPE
                 and st[2][-1] in ("local", "global")]
        for st in steps:
            st[2][-1] = TILE_SCOPE
        changed += bool(steps)
        renamed[before] = fingerprint(ms.database.TuningRecord.from_json(rec[1], workloads[rec[0]]).trace)
    (directory / "database_tuning_record.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    choices = json.loads((directory / CHOICES).read_text())
    for entry in choices.values():
        if entry.get("trace") in renamed:
            entry["trace"] = renamed[entry["trace"]]
    (directory / CHOICES).write_text(json.dumps(choices, indent=1, sort_keys=True) + "\n")
    return changed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS, metavar="MODEL:SIZE:BATCH:WIDTH")
    p.add_argument("--minutes", type=float, default=15.0, help="tuning time per config (default 15)")
    p.add_argument("--scratch", default="build/ship-db", help="the tuning directory (kept: resumes)")
    p.add_argument("--package-only", action="store_true",
                   help="no tuning: ship what the scratch directory has")
    p.add_argument("--retile", action="store_true",
                   help="no tuning: rewrite this family's shipped records to the current tile scope")
    args = p.parse_args()
    tgt = targets.resolve(targets.x86())
    if args.retile:
        n = retile(RECORDS / family(tgt))
        print(f"{n} records of {family(tgt)} rewritten to the current tile scope")
        return 0
    fam = family(tgt)
    out = RECORDS / fam
    done = []
    t_all = time.monotonic()
    for spec in [] if args.package_only else args.configs:
        name, size, batch, width = spec.split(":")
        size, batch, width = int(size), int(batch), int(width)
        model = model_for(name, width)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        tasks = extract_tasks(fuse(prepare(model, (x,)), tgt, "auto", True), tuning_target(tgt, 2))
        sizes = {t.name: space_size(t, tgt) for t in tasks}
        kernels = [n for n, k in sizes.items() if k]
        print(f"== {spec}: {len(kernels)} of {len(tasks)} kernels have knobs "
              f"({sum(sizes.values())} points)", flush=True)
        t0 = time.monotonic()
        report = tune(model, tgt, x, trials=sum(sizes.values()), minutes=args.minutes, db=args.scratch,
                      kernels=kernels, progress=sys.stderr.isatty())
        print(report.table(), flush=True)
        done.append({"config": spec, "seconds": round(time.monotonic() - t0), "tasks": len(report.tasks),
                     "tuned": sum(t.kept == "tuned" for t in report.tasks)})
    src = database_dir(args.scratch, tgt)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # only what compile applies: the confirmed records (the scratch directory keeps every
    # measurement, for the next run to resume from)
    shipped = ms.database.JSONDatabase(work_dir=str(tmp), allow_missing=True)
    for rec in applied_database(src, tgt).get_all_tuning_records():
        workload = shipped.commit_workload(rec.workload.mod)
        shipped.commit_tuning_record(ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target,
                                                              rec.args_info))
    tuned = {k: {n: v for n, v in e.items() if n != "raced"} for k, e in read_choices(src).items()
             if e.get("choice") == "tuned"}
    (tmp / CHOICES).write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")
    info = machine_info()
    old = out / "SOURCE.json"
    if args.package_only and old.is_file():  # the configs tuned before
        done = json.loads(old.read_text()).get("configs", [])
    (tmp / "SOURCE.json").write_text(json.dumps({
        "cpu": info.get("cpu", "?"), "target": str(tuning_target(tgt, 2)), "family": fam,
        "date": datetime.date.today().isoformat(), "configs": done,
        "command": "python benchmarks/ship_records.py " + " ".join(sys.argv[1:]),
        "seconds": round(time.monotonic() - t_all)}, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"records for {fam} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
