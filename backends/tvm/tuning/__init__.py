"""MetaSchedule autotuning of a model's kernels, on this machine or on devices behind a TVM RPC tracker.

``tune(model, target, example_inputs, trials=N, db=DIR)`` imports the model as
:func:`..compiler.compile` does (same passes, same fused kernels), extracts the kernels as
MetaSchedule tasks, spreads ``N`` trials across them and tunes them one after another, storing
every measured candidate in a JSON database under ``DIR/<target key>/``. Compiling later with
``compile(..., database=DIR)`` applies the best record of every kernel that has one; the
compiled model reports those kernels as ``tuned``.

The loop, per call:

1. **Tasks.** The module after TVM's legalize / FuseOps / FuseTIR (:func:`..pipeline.fuse`), its
   PrimFuncs extracted with ``ms.relax_integration.extract_tasks`` (structurally equal kernels
   are one task; the weight is how often the model calls it). Cost of a task = FLOPs per call x
   weight (``estimate_tir_flops``). Tasks under :data:`SKIP_SHARE` of the model's cost (reshapes,
   pooling, the tiny hoisted-mean kernels of small layers...) are not tuned: they keep dcgraph's
   default schedule, and the report lists them.
2. **Budget.** ``trials`` is the total for the model. Every tuned task gets at least
   :data:`MIN_TRIALS`, the rest goes by cost (largest remainder); when ``trials`` cannot give
   every task its minimum, the costliest tasks get it and the others are skipped ("budget").
3. **Resume.** ``trials`` is a target, not an increment: trials already in the database (search
   records of the task's workload) count towards each task's share, so a second ``tune`` with
   the same ``trials`` finishes what an interrupted one left and does nothing after a complete
   one; a larger ``trials`` spends only the difference. MetaSchedule's evolutionary search seeds
   its population from the database's best records, so a resumed search continues from them.
4. **Baseline.** Each task's default schedule (what ``compile`` runs without a record) is
   measured once on the same device, checked like any candidate and committed as a record, so
   the database's best is never slower than the default (the table's ``kept`` column says which
   won).
5. **Search.** ``ms.tune_tasks`` per task with MetaSchedule's evolutionary search and cost
   model: XGBoost when ``xgboost`` imports, else a random model (``cost_model="auto"``; the
   report states which). Batches of ``budget/4`` candidates (8 to 32), a population of 32 per
   candidate up to MetaSchedule's 512 (its full population for a handful of trials spends more
   time in the genetic search than in measuring, on two cores). One cost model for the run.
   Progress bar: task (trials done + to do), trials, best time so far. MetaSchedule's log
   goes to ``DIR/<target key>/logs/tune.log``, not the console. The design space is the
   target's default with one postprocessor added (:mod:`.postprocs`): it drops the candidates
   whose reduction TVM's ``RewriteReductionBlock`` would decompose into wrong code (a reduction
   recomputed under a consumer's loop, as the hoisted mean's tap sums can be), so the search
   does not spend trials on them.
6. **Measurement and checking** (:mod:`.measure`). Kernels are built here (without the 28 s
   ``tensor_intrin`` import of MetaSchedule's default builder), exported as shared libraries
   (cross-compiled for ARM) and measured by :class:`.measure.Runner`: on this CPU, or on a device of
   ``key`` requested from the tracker at ``rpc`` for each candidate. Before timing, every
   candidate runs once on fixed pseudo-random inputs and all its buffers are compared with the
   task's reference (the unscheduled PrimFunc built for this machine's CPU). A candidate that
   differs (relative error over :data:`CHECK_RTOL`) is stored as a failed measurement, never
   as a usable record, and the report counts wrong results per task.

Every measured candidate is appended to the database as it is measured; an interrupted run
(Ctrl-C, a killed process or device) keeps them, and :func:`..database.open_database` drops a line cut
short by a kill. A candidate whose measurement failed because the *device* failed (over RPC)
is not stored, so a resumed run measures it. When no measurement of a batch succeeds because
no device can be reached (or two batches in a row fail), the run stops with :class:`TuneError`
(one line; the partial report is ``err.report``). One process at a time per database.

The rooms: :mod:`.tasks` (tasks, selection, budget), :mod:`.records` (what the database holds
for a task), :mod:`.measure` (build, export, check and time in workers), :mod:`.progress`
(the measure callback: records, counts, stop), :mod:`.postprocs` (the candidate filter),
:mod:`.report`, :mod:`.tools` (cost model, target, logs, Ctrl-C), :mod:`.loop` (:func:`tune`).

Not done: CUDA targets (MetaSchedule on a GPU needs a GPU runner and dlight-style spaces; the
function says so), and tasks below :data:`SKIP_SHARE` unless named in ``kernels``.
"""

from ..database import database_dir, open_database, target_key
from ..errors import TuneError
from .loop import tune
from .measure import CHECK_RTOL
from .report import TaskReport, TuneReport
from .tasks import MIN_TRIALS, SKIP_SHARE, Task, extract_tasks, split_budget

__all__ = ["CHECK_RTOL", "MIN_TRIALS", "SKIP_SHARE", "Task", "TaskReport", "TuneError", "TuneReport",
           "database_dir", "extract_tasks", "open_database", "split_budget", "target_key", "tune"]
