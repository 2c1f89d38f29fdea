"""MetaSchedule tuning (dcgraph.backends.tvm.tuning): records, resume, reuse by compile, RPC, failures.

One conv -> BatchNorm -> relu block (8 -> 8 channels, 8x8 input) gives two fused Deep Control
kernels (the hoisted shift and the conv with its epilogue); two trials each keep the module
around two minutes on two cores. The killed-process resume, the dead fleet and the ARM round trip
(emulated device) are marked slow.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dcgraph.backends.tvm import compile as compile_any_layout
from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.database import read_choices
from dcgraph.backends.tvm.errors import CompileError
from dcgraph.backends.tvm.tuning import (
    TuneError,
    database_dir,
    open_database,
    split_budget,
    target_key,
)
from dcgraph.backends.tvm.tuning import tune as tune_any_layout
from dcgraph.cli import main as cli_main
from dcgraph.testing import live_mean, relative_error
from dcgraph.zoo import randomize_norm_stats

SHAPE = (1, 8, 16, 16)  # 8x8 outputs: plan auto keeps the hoisted pair (dc_shift, dc_conv)
TARGET = targets.resolve("x86")
# the tuning machinery is tested on the NCHW kernels (two named kernels); the blocked layout's
# tuned route has its own test at the end
tune = functools.partial(tune_any_layout, layout="nchw")
tvm_compile = functools.partial(compile_any_layout, layout="nchw")
ROOT = Path(__file__).resolve().parents[2]


def block() -> nn.Module:
    """The model under test (also loaded by the CLI as tests.backends.test_tune:block): conv + BN +
    relu converted to Deep Control with the mean path live (a != 0), so a tuned kernel whose
    mean is wrong cannot match; strided, so that a shift ignoring the stride cannot either."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    return live_mean(randomize_norm_stats(model))


def example() -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))


def records(db: Path) -> list[list]:
    """Every line of the target's tuning-record file, parsed (fails on a damaged line)."""
    path = database_dir(db, TARGET) / "database_tuning_record.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def valid(recs: list[list]) -> list[list]:
    return [r for r in recs if min(r[1][1]) < 1e9]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One local tuning run: 4 trials, 2 per kernel."""
    db = tmp_path_factory.mktemp("tune") / "db"
    report = tune(block(), TARGET, example(), trials=4, db=db, progress=False, min_trials=2)
    return db, report


def test_split_budget_gives_the_minimum_first_then_by_cost():
    budget = split_budget([100.0, 10.0, 1.0], 40, 8)
    assert sum(budget) == 40 and min(budget) >= 8 and budget[0] > budget[1] >= budget[2]
    assert split_budget([100.0, 10.0, 1.0], 16, 8) == [8, 8, 0]  # the costliest get their minimum
    assert split_budget([5.0], 3, 8) == [3]
    assert split_budget([1.0, 1.0], 0, 8) == [0, 0]


def test_target_keys_separate_targets():
    assert target_key("x86").startswith("llvm-x86_64-")
    assert target_key("arm") == "llvm-aarch64-cortex-a72-neon"
    assert target_key({"kind": "llvm", "mcpu": "znver3", "num-cores": 4}) == \
        target_key({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})


def test_tuning_writes_records_per_target(tuned):
    db, report = tuned
    assert {t.name for t in report.tasks} == {"dc_conv", "dc_shift"}
    assert all(t.trials == t.budget == 2 for t in report.tasks)
    assert report.trials_run == 4
    assert report.cost_model in ("XGBoost", "random (xgboost is not installed; pip install xgboost-cpu for "
                                 "XGBoost)")
    recs = records(db)
    # 4 search trials + the two default schedules, each checked on the device before it was kept
    assert len(recs) == 6
    assert valid(recs)
    assert all(t.default_ms is not None and t.best_ms is not None for t in report.tasks)
    assert (database_dir(db, TARGET) / "database_workload.json").is_file()
    assert "dc_conv" in report.table() and "cost model" in report.table()


def test_a_second_run_resumes_instead_of_starting_over(tuned, capsys, tmp_path):
    db, _ = tuned
    before = len(records(db))
    out_json = tmp_path / "report.json"
    rc = cli_main(["tune", "tests.backends.test_tune:block", "--input-shape", "1,8,16,16", "--trials", "4",
                   "--min-trials", "2", "--layout", "nchw", "--db", str(db), "--json", str(out_json),
                   "--no-progress"])
    assert rc == 0
    assert len(records(db)) == before  # nothing left to do: same budget, already spent
    out = capsys.readouterr().out
    assert "0 new trials" in out and "cost model:" in out
    data = json.loads(out_json.read_text())
    assert [t["trials_before"] for t in data["tasks"]] == [2, 2]
    # a larger budget spends only the difference
    report = tune(block(), TARGET, example(), trials=6, db=db, progress=False, min_trials=2)
    assert 1 <= report.trials_run <= 2
    assert sum(t.trials for t in report.tasks) == 4 + report.trials_run
    assert len(records(db)) == before + report.trials_run
    if report.trials_run < 2:  # MetaSchedule ran out of new candidates: the report says so
        assert any("the search stopped after" in t.note for t in report.tasks), report.table()


def test_compiled_model_uses_the_tuned_kernels_and_matches(tuned):
    db, report = tuned
    model, x = block(), example()
    compiled = tvm_compile(model, TARGET, x, database=db)  # the tuning directory: its x86 sub-database
    # the choices confirmed last (the resume test above may have tuned more and re-raced them)
    kept = {e["task"]: e["choice"] for e in read_choices(database_dir(db, TARGET)).values()}
    assert {t.name for t in report.tasks} == set(kept)
    assert set(kept) == {"dc_conv", "dc_shift"} and all(v in ("tuned", "default") for v in kept.values())
    # a kernel whose default schedule won the confirmation keeps it (no record applied)
    untuned = {k.name: k.schedule for k in tvm_compile(model, TARGET, x).kernels}
    expected = {name: "tuned" if kept[name] == "tuned" else untuned[name] for name in untuned}
    assert {k.name: k.schedule for k in compiled.kernels} == expected
    n_tuned = sum(v == "tuned" for v in expected.values())
    if n_tuned:
        assert f"{n_tuned} tuned" in compiled.summary()
    with torch.no_grad():
        want = model(x)
    got = compiled(x)
    assert relative_error(got, want) < 1e-4
    # one database directory given directly works too
    again = tvm_compile(model, TARGET, x, database=database_dir(db, TARGET))
    assert {k.name: k.schedule for k in again.kernels} == expected


def test_compile_says_when_the_database_has_no_records_for_the_target(tuned):
    db, _ = tuned
    with pytest.raises(CompileError, match=r"no tuning records for .*aarch64"):
        tvm_compile(block(), "arm", example(), database=db)


def test_wrong_results_are_reported_and_never_used(tmp_path, monkeypatch):
    """Outputs that disagree with the reference (here the reference is off by one, so every real
    output the workers check is wrong): every candidate and the default schedule fail the check,
    nothing usable is stored, compile keeps the default."""
    from dcgraph.backends.tvm.tuning import measure

    real = measure.reference_outputs

    def off_by_one(task, arrays):
        return [o + 1 if "float" in str(o.dtype) else o for o in real(task, arrays)]

    monkeypatch.setattr(measure, "reference_outputs", off_by_one)
    db = tmp_path / "db"
    report = tune(block(), TARGET, example(), trials=2, db=db, progress=False, min_trials=2)
    (task,) = report.tasks  # 2 trials: only the costliest kernel gets its minimum
    assert task.name == "dc_conv" and task.wrong_results == 2 and task.kept == "-"
    assert "wrong results" in report.table() and "default schedule failed" in task.note
    assert records(db) and not valid(records(db))
    monkeypatch.undo()
    compiled = tvm_compile(block(), TARGET, example(), database=db)
    assert {k.name: k.schedule for k in compiled.kernels}["dc_conv"] == "default"


@pytest.mark.slow  # a CLI process tuning 12 trials, killed after 8, then resumed: ~100 s
def test_a_killed_tuning_process_keeps_its_records_and_resumes(tmp_path):
    db = tmp_path / "db"
    rec = database_dir(db, TARGET) / "database_tuning_record.json"
    # 12 trials: all to dc_conv (dc_shift cannot get the minimum of 8), measured 8 at a time
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcgraph.cli", "tune", "tests.backends.test_tune:block", "--input-shape",
         "1,8,16,16", "--layout", "nchw", "--trials", "12", "--db", str(db), "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (rec.is_file() and len(rec.read_text().splitlines()) >= 9):  # default + first batch
            assert proc.poll() is None, "the tuning process ended before it was killed"
            assert time.monotonic() < deadline, "no records after 120 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # SIGKILL, its runner and builder workers too
        proc.wait(10)
    kept = records(db)  # every line parses
    assert len(kept) >= 9
    assert len(open_database(db, TARGET).get_all_tuning_records()) == len(kept)
    # a cut-short last line (a kill in the middle of a write) is dropped when the database opens
    with rec.open("a") as f:
        f.write('[0,[[[["GetSBlock",[],["pa')
    open_database(db, TARGET)
    assert len(records(db)) == len(kept)
    # the same command again finishes the budget
    report = tune(block(), TARGET, example(), trials=12, db=db, progress=False)
    (task,) = report.tasks
    assert task.trials_before >= 8 and task.trials == 12
    assert report.trials_run == 12 - task.trials_before


def _servers(tracker, n: int, key: str):
    from dcgraph.backends.tvm.remote.rpc import Server

    servers = [Server(tracker.address, key) for _ in range(n)]
    threads = [threading.Thread(target=s.start) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return servers


def test_a_tracker_without_devices_fails_at_once_with_the_reason(tmp_path):
    from dcgraph.backends.tvm.remote.rpc import Tracker

    kw = dict(trials=4, db=tmp_path / "db", key="x86-test", progress=False)
    with Tracker() as tracker, pytest.raises(TuneError, match="no RPC server with key 'x86-test'"):
        tune(block(), TARGET, example(), rpc=tracker.address, **kw)
    with pytest.raises(TuneError, match="not reachable"):  # the tracker is gone
        tune(block(), TARGET, example(), rpc=tracker.address, **kw)


@pytest.mark.slow  # two RPC servers started and measuring: ~50 s (kernels run over RPC on the
# emulated ARM server in the default suite: test_tvm_arm.py, test_whole_models.py)
def test_rpc_tracker_and_two_servers_measure(tmp_path):
    from dcgraph.backends.tvm.remote.rpc import Tracker

    db = tmp_path / "db"
    with Tracker() as tracker:
        assert tracker.host == "127.0.0.1"
        servers = _servers(tracker, 2, "x86-test")
        try:
            assert all(s.proc is not None for s in servers)
            # one kernel, one batch of two candidates: one for each device
            report = tune(block(), TARGET, example(), trials=2, db=db, rpc=tracker.address, key="x86-test",
                          progress=False, min_trials=2, kernels=["dc_conv"])
            assert "2 devices" in report.device
            (task,) = report.tasks
            # the task spends its budget, unless MetaSchedule runs out of new candidates first
            assert task.trials_run == 2 or "no new candidates" in task.note, report.table()
            assert report.trials_run >= 1
            assert all(s.sessions() > 0 for s in servers), [s.sessions() for s in servers]
        finally:
            for s in servers:
                s.stop()


@pytest.mark.slow  # waits for the dead devices' measurements to fail: ~100 s
def test_a_dead_fleet_stops_the_run_with_its_records_kept(tmp_path):
    from dcgraph.backends.tvm.remote.rpc import Tracker

    db = tmp_path / "db"
    with Tracker() as tracker:
        servers = _servers(tracker, 2, "x86-test")
        try:
            tune(block(), TARGET, example(), trials=4, db=db, rpc=tracker.address, key="x86-test",
                 progress=False, min_trials=4)
            # the whole fleet dies in the middle of a run: a clear error, not a hang; records kept
            rec = database_dir(db, TARGET) / "database_tuning_record.json"
            start = len(rec.read_text().splitlines())

            def kill_when_measuring():
                deadline = time.monotonic() + 120
                while len(rec.read_text().splitlines()) < start + 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
                for s in servers:
                    s.kill()

            killer = threading.Thread(target=kill_when_measuring, daemon=True)
            killer.start()
            with pytest.raises(TuneError, match="no RPC server with key 'x86-test'") as err:
                tune(block(), TARGET, example(), trials=64, db=db, rpc=tracker.address, key="x86-test",
                     progress=False, min_trials=4)
            assert "\n" not in str(err.value) and "kept in" in str(err.value)
            assert err.value.report is not None and err.value.report.error
            assert len(records(db)) >= start + 2  # everything measured before the kill
            open_database(db, TARGET)
        finally:
            for s in servers:
                s.stop()


def test_cli_reports_errors_in_one_line(capsys):
    rc = cli_main(["tune", "tests.backends.test_tune:block", "--input-shape", "1,8,16,16", "--trials", "4",
                   "--rpc", "127.0.0.1:9"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "dcgraph tune: error: --rpc HOST:PORT and --key NAME go together"


@pytest.mark.slow
def test_arm_tuning_over_rpc_on_the_emulated_device(tmp_path):
    """The emulated aarch64 server registered with a tracker: cross-compiled candidates measured
    there (timings meaningless), then the tuned model runs there and matches."""
    from dcgraph.backends.tvm.remote import ArmRpcServer, EmulationUnavailable, ensure_arm_root
    from dcgraph.backends.tvm.remote.rpc import Tracker

    try:
        root = ensure_arm_root()
    except EmulationUnavailable as exc:
        pytest.skip(f"ARM emulation unavailable: {exc}")
    db = tmp_path / "db"
    model, x = block(), example()
    with Tracker() as tracker, ArmRpcServer(root, tracker=tracker.address, key="arm64") as server:
        report = tune(model, "arm", x, trials=8, db=db, rpc=tracker.address, key="arm64", progress=False,
                      min_trials=4)
        assert report.trials_run == 8 and report.wrong_results == 0
        assert (db / "llvm-aarch64-cortex-a72-neon" / "database_tuning_record.json").is_file()
        compiled = tvm_compile(model, "arm", x, database=db)
        assert all(k.schedule == "tuned" for k in compiled.kernels)
        got = compiled.remote(server.connect())(x)
    with torch.no_grad():
        want = model(x)
    assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("mutation", ["ignore_stride", "ignore_a"])
def test_a_broken_mean_fails_the_tuned_build_check(tuned, mutation, monkeypatch):
    """The tuned route's whole-model check (above) sees a broken mean: with the hoisted shift
    ignoring the stride or a, the build from the database no longer matches (the model has a != 0)."""
    from tests.backends.tvm_cases import apply_mutation

    db, _ = tuned
    model, x = block(), example()
    apply_mutation(monkeypatch, mutation)
    compiled = tvm_compile(model, TARGET, x, database=db)
    with torch.no_grad():
        want = model(x)
    assert not relative_error(compiled(x), want) < 1e-4


def test_the_blocked_layout_tunes_and_builds_from_its_records(tmp_path):
    """The default (blocked) layout's kernels are tasks too, and a build of the same layout uses
    the records and matches the eager model."""
    db = tmp_path / "db"
    report = tune_any_layout(block(), TARGET, example(), trials=2, db=db, progress=False, min_trials=2)
    tuned = [t.name for t in report.tasks if t.trials_run]
    assert tuned and all(name.startswith("dc_") for name in tuned)
    model, x = block(), example()
    compiled = compile_any_layout(model, TARGET, x, database=db)
    kept = {t.name: t.kept for t in report.tasks}
    assert {k.name: k.schedule for k in compiled.kernels}[tuned[0]] == \
        ("tuned" if kept[tuned[0]] == "tuned" else "default")
    with torch.no_grad():
        want = model(x)
    assert relative_error(compiled(x), want) < 1e-4
