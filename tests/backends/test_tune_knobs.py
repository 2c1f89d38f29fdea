"""The knob spaces of the default schedules (issue 16): every candidate correct, replayable, and
the tuner's choices (confirmed against the default) what ``compile`` applies.

Kernels come from one small model through the real pipeline (blocked layout): a 3x3 stride-1
conv (Winograd), a strided 3x3 and a 1x1 (the blocked direct conv), a depthwise 3x3 (the
one-kernel depthwise Deep Control). Each candidate of each space is built for this CPU and its
outputs compared with the unscheduled kernel's (what the schedules must not change).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn
from tvm.s_tir import Schedule

from dcgraph.backends.tvm import compile as tvm_compile
from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.database import CHOICES, database_dir, read_choices, workload_key
from dcgraph.backends.tvm.frontends import prepare
from dcgraph.backends.tvm.pipeline import fuse
from dcgraph.backends.tvm.schedules import decisions, knob_space, traced_candidate, traced_default
from dcgraph.backends.tvm.tuning import extract_tasks, tune
from dcgraph.backends.tvm.tuning.loop import _budgets
from dcgraph.backends.tvm.tuning.measure import WRONG, compare, fixed_inputs, mismatch, reference_outputs
from dcgraph.backends.tvm.tuning.tools import tuning_target
from dcgraph.testing import live_mean, relative_error
from dcgraph.zoo import randomize_norm_stats

HOST = targets.resolve("x86")
AVX512 = targets.resolve({"kind": "llvm", "mcpu": "skylake-avx512", "mtriple": "x86_64-linux-gnu"})
AVX2 = targets.resolve({"kind": "llvm", "mcpu": "haswell", "mtriple": "x86_64-linux-gnu"})
RULES = {"blocked_winograd", "blocked_conv", "blocked_depthwise_dc"}


def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),   # Winograd
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # strided
        nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),  # 1x1
        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # depthwise
    )
    return live_mean(randomize_norm_stats(m)).eval()


def example(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, 28, 28, generator=torch.Generator().manual_seed(1))


def tasks_for(target: tvm.target.Target) -> list:
    mod = prepare(model(), (example(),))
    return extract_tasks(fuse(mod, target, "auto", True), tuning_target(target, 2))


@pytest.fixture(scope="module")
def host_tasks():
    return tasks_for(HOST)


def spaces(tasks, target) -> dict[str, tuple]:
    out = {}
    for t in tasks:
        rule, points = knob_space(t.mod, target)
        if rule in RULES:
            out.setdefault(rule, (t, points))
    return out


def test_every_tunable_rule_has_a_space_with_the_default_first(host_tasks):
    found = spaces(host_tasks, HOST)
    assert set(found) == RULES
    for rule, (task, points) in found.items():
        assert len(points) >= 2, (rule, points)
        assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points)
        # the default point is what compile runs: the same PrimFunc as the untraced default
        first = traced_candidate(task.mod, HOST, points[0])
        assert tvm_ffi.structural_equal(first.mod, traced_default(task.mod, HOST).mod), rule
        # every other point is a different schedule, named by its decisions
        keys = {decisions(traced_candidate(task.mod, HOST, p).trace) for p in points[1:]}
        assert len(keys) == len(points) - 1 and () not in keys, rule


def test_a_candidate_record_replays_to_the_same_schedule(host_tasks):
    task, points = spaces(host_tasks, HOST)["blocked_conv"]
    sch = traced_candidate(task.mod, HOST, points[-1])
    again = Schedule(task.mod)
    sch.trace.apply_to_schedule(again, remove_postproc=False)
    assert tvm_ffi.structural_equal(again.mod, sch.mod)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_point_of_the_space_computes_what_the_unscheduled_kernel_does(host_tasks, rule):
    task, points = spaces(host_tasks, HOST)[rule]
    args = [a.as_json() for a in tvm.s_tir.meta_schedule.arg_info.ArgInfo.from_prim_func(task.mod["main"])]
    arrays = fixed_inputs(args)
    want = reference_outputs(task, arrays)
    dev = tvm.cpu()
    for values in points:
        lib = tvm.tirx.build(traced_candidate(task.mod, HOST, values).mod, target=HOST)
        tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
        lib["main"](*tensors)
        got = [t.numpy() for t in tensors]
        assert mismatch(got, want) is None, (rule, values, mismatch(got, want))


@pytest.mark.parametrize("target", [AVX512, AVX2], ids=["avx512", "avx2"])
def test_spaces_follow_the_target_and_compile_for_both_x86_families(target):
    found = spaces(tasks_for(target), target)
    assert set(found) == RULES
    task, points = found["blocked_conv"]
    lanes = 16 if target is AVX512 else 8
    out = tvm.s_tir.meta_schedule.arg_info.ArgInfo.from_prim_func(task.mod["main"])[-1].as_json()
    assert int(out[2][-1]) == lanes  # the output's channel block is the target's vector width
    for values in points[:3]:
        tvm.tirx.build(traced_candidate(task.mod, target, values).mod, target=target)


def test_conv_tiles_fill_the_registers():
    from dcgraph.backends.tvm.schedules.cpu_blocked import conv_tile

    # (reg_n, oc_tile) for (row width, channel blocks, block, lanes): AVX2 holds 8 accumulators
    assert conv_tile(28, 16, 8, 8) == (4, 2)
    assert conv_tile(14, 32, 8, 8) == (2, 4)  # no 4-column tile: 2 x 4 (8) beats 7 x 1 (7)
    assert conv_tile(14, 2, 8, 8) == (7, 1)  # 4 blocks do not divide 2
    assert conv_tile(7, 64, 8, 8) == (7, 1)  # 7 x 1 (7) beats 1 x 4 (4)
    assert conv_tile(14, 16, 16, 16) == (7, 2)  # AVX-512: 16 accumulators


def test_a_narrow_row_runs_the_input_chunks_outside_its_tiles_on_avx2():
    """The model's strided conv (16 -> 32 channels, a 14-wide output row) on AVX2: 2 columns x 4
    channel blocks with the input-channel chunks outside the row's tiles by default, and that
    kernel (built for haswell, which every x86 host of this kind runs) computes what the
    unscheduled one does."""
    convs = [t for t in tasks_for(AVX2) if knob_space(t.mod, AVX2)[0] == "blocked_conv"]
    found = []
    for task in convs:
        _, points = knob_space(task.mod, AVX2)
        if points[0].get("ic_outer") == 1:
            found.append((task, points[0]))
    assert len(found) == 1, [knob_space(t.mod, AVX2)[1][0] for t in convs]
    task, default = found[0]
    assert (default["oc_tile"], default["reg_n"]) == (4, 2)
    args = [a.as_json() for a in tvm.s_tir.meta_schedule.arg_info.ArgInfo.from_prim_func(task.mod["main"])]
    arrays = fixed_inputs(args)
    want = reference_outputs(task, arrays)
    lib = tvm.tirx.build(traced_default(task.mod, AVX2).mod, target=AVX2)
    tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
    lib["main"](*tensors)
    assert mismatch([t.numpy() for t in tensors], want) is None


def test_budgets_cap_small_spaces_and_give_the_rest_to_the_others(host_tasks):
    tasks = host_tasks[:3]
    sizes = [2, 0, 50]
    got = _budgets(tasks, sizes, 40, 4)
    assert got[0] == 2 and sum(got) == 40 and got[2] <= 50
    assert _budgets(tasks, sizes, None, 4) == [2, 256, 50]


def test_compare_times_interleaved_and_flags_a_wrong_kernel(host_tasks, tmp_path):
    task, points = spaces(host_tasks, HOST)["blocked_conv"]
    args_info = tvm.s_tir.meta_schedule.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    args = [a.as_json() for a in args_info]
    ref = reference_outputs(task, fixed_inputs(args))
    ref_path = tmp_path / "ref.npz"
    np.savez(ref_path, **{f"a{i}": r * (1.5 if i == len(ref) - 1 else 1.0) for i, r in enumerate(ref)})
    good = tmp_path / "good.npz"
    np.savez(good, **{f"a{i}": r for i, r in enumerate(ref)})
    paths = []
    for i, values in enumerate(points[:2]):
        lib = tvm.tirx.build(traced_candidate(task.mod, HOST, values).mod, target=HOST)
        paths.append(str(tmp_path / f"k{i}.so"))
        lib.export_library(paths[-1])
    job = {"artifacts": paths, "device_type": "cpu", "args_info": args, "rounds": 3, "min_repeat_ms": 1,
           "ref": str(good)}
    times = compare(job)
    assert all(isinstance(t, list) and len(t) == 3 and min(t) > 0 for t in times)
    job["ref"] = str(ref_path)  # the output scaled by 1.5: every kernel now differs from it
    assert all(isinstance(t, str) and WRONG in t for t in compare(job))


@pytest.fixture(scope="module")
def knob_db(tmp_path_factory):
    """One tuning run on the host: the knob search on the strided conv's kernel alone."""
    db = tmp_path_factory.mktemp("knobs") / "db"
    names = [t.name for t in tasks_for(HOST) if knob_space(t.mod, HOST)[0] == "blocked_conv"]
    report = tune(model(), HOST, example(), trials=6, db=db, progress=False, min_trials=2, kernels=names[:1])
    return db, report, names[0]


def test_the_knob_search_measures_its_space_and_confirms_a_choice(knob_db):
    db, report, name = knob_db
    (task_rep,) = report.tasks
    assert task_rep.name == name and task_rep.trials_run == task_rep.budget >= 2
    assert task_rep.kept in ("tuned", "default") and task_rep.speedup is not None and task_rep.speedup >= 1.0
    choices = read_choices(database_dir(db, HOST))
    (entry,) = choices.values()
    assert entry["task"] == name and entry["choice"] == task_rep.kept
    # a second run with the same budget measures nothing new
    again = tune(model(), HOST, example(), trials=6, db=db, progress=False, min_trials=2, kernels=[name])
    assert again.trials_run == 0


def test_compile_follows_the_confirmed_choice(knob_db, tmp_path):
    db, _, name = knob_db
    directory = database_dir(db, HOST)
    m, x = model(), example()
    with torch.no_grad():
        want = m(x)
    lines = (directory / "database_tuning_record.json").read_text().splitlines()
    assert len(lines) >= 3
    task = next(t for t in tasks_for(HOST) if t.name == name)
    key = workload_key(task.mod)
    from dcgraph.backends.tvm.database import fingerprint, open_database
    from dcgraph.backends.tvm.tuning.records import is_search

    database = open_database(db, HOST)
    search = [r for r in database.get_all_tuning_records() if is_search(r)]
    for choice in ("default", "tuned"):
        entry = {"task": name, "choice": choice}
        if choice == "tuned":
            entry["trace"] = fingerprint(search[-1].trace)
        (directory / CHOICES).write_text(json.dumps({key: entry}))
        compiled = tvm_compile(m, HOST, x, database=db)
        kinds = {k.name: k.schedule for k in compiled.kernels}
        assert kinds[name] == ("tuned" if choice == "tuned" else "default"), (choice, kinds)
        assert relative_error(compiled(x), want) < 1e-4


def test_a_time_budget_stops_the_run_and_says_so(tmp_path):
    report = tune(model(), HOST, example(), minutes=0.02, db=tmp_path / "db", progress=False)
    assert report.minutes == 0.02
    assert report.seconds < 60
    assert any("time ran out" in t.note for t in report.tasks), report.table()


# ------------------------------------------------------------------ records shipped with dcgraph

def test_record_families_follow_the_vector_unit():
    from dcgraph.backends.tvm.shipped import family

    assert family(AVX512) == "x86_64-avx512"
    assert family(AVX2) == "x86_64-avx2"
    assert family("arm") == "aarch64-neon"
    assert family({"kind": "cuda", "arch": "sm_90"}) is None


def test_compile_applies_shipped_records_and_says_so(knob_db, tmp_path, monkeypatch):
    from dcgraph.backends.tvm import shipped
    from dcgraph.backends.tvm.database import DB_FILES, fingerprint, open_database
    from dcgraph.backends.tvm.tuning.records import is_search

    db, _, name = knob_db
    fam = shipped.family(HOST)
    ship = tmp_path / "records" / fam
    ship.mkdir(parents=True)
    for f in DB_FILES:
        (ship / f).write_bytes((database_dir(db, HOST) / f).read_bytes())
    task = next(t for t in tasks_for(HOST) if t.name == name)
    search = [r for r in open_database(db, HOST).get_all_tuning_records() if is_search(r)]
    (ship / CHOICES).write_text(json.dumps({workload_key(task.mod): {
        "task": name, "choice": "tuned", "trace": fingerprint(search[0].trace)}}))
    (ship / "SOURCE.json").write_text(json.dumps({"cpu": "a test CPU", "date": "2026-12-07"}))
    monkeypatch.setattr(shipped, "RECORDS", tmp_path / "records")
    m, x = model(), example()
    with torch.no_grad():
        want = m(x)
    compiled = tvm_compile(m, HOST, x)
    assert {k.name: k.schedule for k in compiled.kernels}[name] == "tuned"
    assert f"shipped {fam} records (tuned on a test CPU, 2026-12-07)" in compiled.summary()
    assert relative_error(compiled(x), want) < 1e-4
    plain = tvm_compile(m, HOST, x, shipped=False)
    assert {k.name: k.schedule for k in plain.kernels}[name] == "default"
    assert "records" not in plain.summary()


def test_the_shipped_records_are_whole_and_replay():
    """Every family dcgraph ships: its files are there and each confirmed choice names a record
    whose trace replays onto its kernel."""
    from dcgraph.backends.tvm import shipped
    from dcgraph.backends.tvm.database import DB_FILES, applied_database, fingerprint, open_database

    families = [p for p in shipped.RECORDS.iterdir() if p.is_dir()] if shipped.RECORDS.is_dir() else []
    for directory in families:
        for f in (*DB_FILES, CHOICES, "SOURCE.json"):
            assert (directory / f).is_file(), (directory, f)
        source = json.loads((directory / "SOURCE.json").read_text())
        assert source["family"] == directory.name and source["cpu"]
        database = open_database(directory, HOST)
        records = database.get_all_tuning_records()
        prints = {fingerprint(r.trace) for r in records}
        tuned = [e for e in read_choices(directory).values() if e["choice"] == "tuned"]
        assert all(e["trace"] in prints for e in tuned), directory
        chosen = applied_database(directory, HOST).get_all_tuning_records()
        assert len(chosen) == len(tuned)
        for rec in chosen:
            sch = Schedule(rec.workload.mod)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
