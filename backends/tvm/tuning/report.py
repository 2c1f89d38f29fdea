"""What a tuning run did: one :class:`TaskReport` per tuned task, a :class:`TuneReport` for the run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TaskReport", "TuneReport"]


@dataclass
class TaskReport:
    """One task after tuning. Times in ms; ``kept``: what ``compile`` will use (``tuned``: a search
    record, ``default``: the default schedule, ``-``: nothing in the database). On this machine
    the choice is confirmed by an interleaved re-measurement (:mod:`.confirm`): ``speedup`` is
    the kept schedule's over the default, measured that way."""

    name: str
    origin: str
    weight: int
    mflops: float
    budget: int
    trials_before: int
    trials_run: int = 0
    best_ms: float | None = None
    default_ms: float | None = None
    kept: str = "-"
    wrong_results: int = 0
    errors: int = 0
    note: str = ""
    confirmed_ms: float | None = None  # the kept schedule, re-measured interleaved with ...
    confirmed_default_ms: float | None = None  # ... the default (:mod:`.confirm`)

    @property
    def speedup(self) -> float | None:
        """The kept schedule's speed-up over the default, as confirmed (1.0 where the default is kept)."""
        if self.kept == "default":
            return 1.0
        if self.confirmed_ms and self.confirmed_default_ms:
            return self.confirmed_default_ms / self.confirmed_ms
        return None

    @property
    def trials(self) -> int:
        return self.trials_before + self.trials_run


@dataclass
class TuneReport:
    """What :func:`tune` did; :meth:`table` prints it."""

    target: str
    database: str
    cost_model: str
    device: str
    trials: int
    minutes: float | None = None
    tasks: list[TaskReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    error: str | None = None
    unit: str = "ms"  #: of best / default: ``ms`` (timed) or ``M instr`` (counted, ARM)

    @property
    def trials_run(self) -> int:
        return sum(t.trials_run for t in self.tasks)

    @property
    def wrong_results(self) -> int:
        return sum(t.wrong_results for t in self.tasks)

    def table(self) -> str:
        def ms_(v: float | None) -> str:
            return f"{v:.4g}" if v is not None else "-"

        unit = self.unit
        rows = [("task", "kind", "calls", "MFLOP", "trials", "new", f"best {unit}", f"default {unit}", "kept",
                 "speed-up", "wrong")]
        for t in self.tasks:
            up = f"{t.speedup:.2f}x" if t.speedup is not None else "-"
            rows.append((t.name, t.origin, str(t.weight), f"{t.mflops:.3g}", f"{t.trials}/{t.budget}",
                         str(t.trials_run), ms_(t.best_ms), ms_(t.default_ms), t.kept, up,
                         str(t.wrong_results)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"target {self.target}; {self.device}; cost model: {self.cost_model}; "
                 f"database {self.database}"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in
                                   enumerate(zip(r, widths, strict=True))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        for t in self.tasks:
            if t.note:
                lines.append(f"- {t.name}: {t.note}")
        if self.skipped:
            names = ", ".join(f"{n} ({why})" for n, why in self.skipped)
            lines.append(f"not tuned (default schedules): {names}")
        status = "interrupted; " if self.interrupted else ""
        lines.append(f"{status}{self.trials_run} new trials in {self.seconds:.0f} s; "
                     f"{sum(t.trials for t in self.tasks)} in the database for these tasks")
        if self.wrong_results:
            lines.append(f"WARNING: {self.wrong_results} candidates returned wrong results on the device; "
                         "they are stored as failed measurements and never used")
        if self.error:
            lines.append(f"stopped: {self.error}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

