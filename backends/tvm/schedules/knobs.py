"""The knobs of the default schedules: what ``compile`` fixes and what ``tune`` searches.

A rule with choices to make (a register tile's shape, whether a loop is unrolled) asks a
:class:`Knobs` for each: ``knobs.pick(name, choices, default)``. ``compile`` passes
:data:`DEFAULTS`, whose picks are the defaults: the hand-chosen schedule. ``tune`` enumerates a
kernel's space (:func:`space`: every combination of the picks its rule asks for, the choices of
a later pick may depend on an earlier one) and builds each candidate with :class:`Fixed`, which
returns the candidate's values and records each pick with more than one choice in the trace as a
``SampleCategorical`` with its decision. A record of a candidate therefore replays to the same
schedule, and its decisions name its knobs (:func:`decisions`).

So every candidate the search measures is a variant of the default schedule, built by the same
rule; the default itself is one point of the space (the first one measured).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DEFAULTS", "Fixed", "Knobs", "decisions", "space"]


class Knobs:
    """The defaults: every pick returns its default (what ``compile`` runs without a record)."""

    def pick(self, name: str, choices: Sequence[int], default: int) -> int:
        return int(default)


DEFAULTS = Knobs()


class Fixed(Knobs):
    """Picks fixed to ``values`` (the default for a name it lacks); each pick with more than one
    choice is recorded in ``sch``'s trace as a ``SampleCategorical`` with its decision.

    ``asked`` lists ``(name, choices, default)`` of every pick, in order."""

    def __init__(self, sch: Any | None, values: dict[str, int] | None = None) -> None:
        self.sch = sch
        self.values = dict(values or {})
        self.asked: list[tuple[str, list[int], int]] = []

    def pick(self, name: str, choices: Sequence[int], default: int) -> int:
        options = list(dict.fromkeys(int(c) for c in choices))
        default = int(default)
        if default not in options:
            options.insert(0, default)
        self.asked.append((name, options, default))
        value = int(self.values.get(name, default))
        if value not in options:
            raise ValueError(f"knob {name}={value} is not one of {options}")
        if self.sch is not None and len(options) > 1:
            self.sch.sample_categorical(options, [1.0 / len(options)] * len(options),
                                        decision=options.index(value))
        return value


def space(apply: Callable[[Knobs], bool], limit: int = 256) -> list[dict[str, int]]:
    """Every combination of the picks ``apply(knobs)`` asks for (it schedules a fresh copy of the
    kernel and returns whether the rule took it), the default first, at most ``limit``.

    Explored depth first: run with some names fixed, and the first name the rule asks for that
    is not fixed yet branches into its choices. A combination the rule refuses (returns False
    or raises a schedule error) is left out."""
    import tvm

    found: list[dict[str, int]] = []
    stack: list[dict[str, int]] = [{}]
    while stack and len(found) < limit:
        fixed = stack.pop()
        knobs = Fixed(None, fixed)
        try:
            ok = apply(knobs)
        except tvm.s_tir.schedule.ScheduleError:
            ok = False
        if not ok:
            continue
        open_ = next(((n, c, d) for n, c, d in knobs.asked if n not in fixed), None)
        if open_ is None:
            full = {n: knobs.values.get(n, d) for n, _, d in knobs.asked}
            if full not in found:
                found.append(full)
            continue
        name, choices, default = open_
        # the default branch last on the stack, so it is explored (and listed) first
        for c in sorted(choices, key=lambda c: c == default):
            stack.append({**fixed, name: c})
    return found


def decisions(trace: Any) -> tuple[int, ...]:
    """The values a record's trace picked (its ``SampleCategorical`` steps, in order); empty for
    the default schedule's record."""
    out = []
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical":
            decision = trace.get_decision(inst)
            if decision is None:
                return ()
            out.append(int(inst.attrs[0][int(decision)]))
    return tuple(out)
