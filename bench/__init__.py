"""``make bench``: every figure of docs/performance.md, measured side by side with its baseline in
the same run on the same machine, so that ratios stay meaningful on shared, noisy hosts.

Each figure is a module with ``run(sandbox, smoke) -> list[Row]``; ``python -m bench`` runs them
and prints one table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Target:
    """A limit on the mailbroker value (``on="value"``) or on mailbroker ÷ baseline (``on="ratio"``)."""

    limit: float
    on: Literal["value", "ratio"] = "value"

    def text(self) -> str:
        return f"≤ {self.limit:g}" + ("x" if self.on == "ratio" else "")

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        measured = value if self.on == "value" else ratio
        if measured is None or math.isnan(measured):
            return None
        return measured <= self.limit + 1e-9


@dataclass
class Row:
    """One line of the table: what mailbroker achieved and what the baseline achieved, measured
    in the same run."""

    figure: str
    mailbroker: float | None
    baseline: float | None
    unit: str = ""
    baseline_label: str = ""
    target: Target | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.mailbroker is None or not self.baseline:
            return None
        return self.mailbroker / self.baseline

    @property
    def met(self) -> bool | None:
        return self.target.met(self.mailbroker, self.ratio) if self.target else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = self.target.text() if self.target else None
        data["ratio"] = self.ratio
        data["met"] = self.met
        return data


COLUMNS = ("figure", "mailbroker", "baseline", "ratio", "target", "met?")


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (readable in a terminal and pasteable into the docs)."""
    lines = [
        [
            row.figure,
            _with_unit(row.mailbroker, row.unit),
            _with_unit(row.baseline, row.unit) + (f" ({row.baseline_label})" if row.baseline_label else ""),
            "—" if row.ratio is None else f"{_number(row.ratio)}x",
            row.target.text() if row.target else "—",
            {True: "yes", False: "NO", None: "—"}[row.met],
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(COLUMNS)]

    def render(cells: list[str] | tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [render(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(render(line) for line in lines)
    return "\n".join(out)


def _with_unit(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{_number(value)} {unit}".rstrip()


def _number(value: float) -> str:
    if value == 0 or math.isnan(value) or math.isinf(value):
        return str(value if not float(value).is_integer() else int(value))
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"
