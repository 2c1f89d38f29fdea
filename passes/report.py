"""What a rewrite did: each match (nodes, kind, init, exact or approximate) and each skip
with its reason, and counts by kind. Returned by every pass; ``str()`` prints a table."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Match:
    rule: str  #: e.g. "conv+batchnorm->deep_control", "conv+deep_control->fused"
    nodes: tuple[str, ...]  #: graph node names, in order (conv first)
    kind: str  #: what was matched: batchnorm, instancenorm, groupnorm, module, function, plain_ops
    act: str = "identity"  #: the activation absorbed
    init: str = ""  #: preserve / fresh for conversions
    exact: bool = True  #: False: the rewritten block computes something else (by design)
    note: str = ""


@dataclass(frozen=True)
class Skip:
    node: str
    reason: str


@dataclass
class RewriteReport:
    """Matches and skips of one or more passes over one graph."""

    matches: list[Match] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  #: whole-graph remarks (an opset upgrade...)

    def matched(self, match: Match) -> None:
        self.matches.append(match)

    def skipped(self, node: str, reason: str) -> None:
        self.skips.append(Skip(node, reason))

    def extend(self, other: RewriteReport) -> RewriteReport:
        self.matches.extend(other.matches)
        self.skips.extend(other.skips)
        self.notes.extend(other.notes)
        return self

    @property
    def counts(self) -> dict[str, int]:
        """Matches by rule and kind, e.g. ``{"conv+batchnorm->deep_control": 20, ...}``."""
        return dict(Counter(m.rule for m in self.matches))

    @property
    def exact(self) -> bool:
        return all(m.exact for m in self.matches)

    def to_dict(self) -> dict:
        return {"matches": [asdict(m) for m in self.matches],
                "skips": [asdict(s) for s in self.skips], "counts": self.counts,
                "exact": self.exact, "notes": list(self.notes)}

    def summary(self) -> str:
        """Counts and skips, without the list of matches."""
        full = str(self).splitlines()
        head = [ln for ln in full if not ln.startswith("matches:")]
        out, skipping = [], False
        for ln in head:
            if ln == "skipped:":
                skipping = True
            if skipping or not ln.startswith(("  conv+", "  fused+")):
                out.append(ln)
        return "\n".join(out)

    def __str__(self) -> str:
        lines = [f"{len(self.matches)} rewrites, {len(self.skips)} skipped"]
        lines += [f"  note: {n}" for n in self.notes]
        for rule, n in sorted(self.counts.items()):
            lines.append(f"  {n:4d} x {rule}")
        approx = [m for m in self.matches if not m.exact]
        if approx:
            lines.append(f"  {len(approx)} APPROXIMATE (the rewritten blocks compute something "
                         "else by design; see notes)")
        if self.matches:
            lines.append("matches:")
            for m in self.matches:
                tags = [m.kind, f"act={m.act}"]
                if m.init:
                    tags.append(f"init={m.init}")
                tags.append("exact" if m.exact else "APPROXIMATE")
                note = f"  ({m.note})" if m.note else ""
                lines.append(f"  {m.rule}: {' -> '.join(m.nodes)} [{', '.join(tags)}]{note}")
        if self.skips:
            lines.append("skipped:")
            for s in self.skips:
                lines.append(f"  {s.node}: {s.reason}")
        return "\n".join(lines)
