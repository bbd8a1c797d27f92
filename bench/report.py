"""The benchmark's figures, the targets they are judged against, and the markdown report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

COLUMNS = ("curl", "local file", "fsmount", "rclone")
SUBJECT = "fsmount"
COMPARED = ("curl", "local file", "rclone")  # each gets a ratio column


@dataclass
class Figure:
    """One row of the table: a value per column, and a short note per column (e.g. traffic).

    `higher_is_better` decides how ratios are oriented: every ratio is fsmount's advantage, so
    above 1x means fsmount did better (faster, fewer bytes, less memory) whatever the unit.
    """

    label: str
    unit: str
    higher_is_better: bool
    values: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def advantage(self, other: str) -> float | None:
        """fsmount's value over `other`'s (inverted when lower is better); None if unknown."""
        mine, theirs = self.values.get(SUBJECT), self.values.get(other)
        if mine is None or theirs is None:
            return None
        if self.higher_is_better:
            return mine / theirs if theirs else math.inf
        return theirs / mine if mine else math.inf


@dataclass(frozen=True)
class Target:
    """A goal from the issue, and whether this run met it (None: could not be measured)."""

    goal: str
    measured: str
    met: bool | None


@dataclass
class Report:
    """Everything `results.md` says."""

    command: str
    started: str  # ISO date and time
    duration: float  # seconds, the whole run
    machine: list[str]
    versions: list[str]
    method: list[str]
    figures: list[Figure]
    targets: list[Target]
    notes: list[str]


def format_value(value: float, unit: str) -> str:
    if unit in ("MiB/s", "MB"):
        return f"{value:,.0f} {unit}"
    if unit == "MiB":
        return f"{value:,.1f} {unit}"
    if unit == "ms":
        return f"{value:,.2f} ms" if value < 10 else f"{value:,.0f} ms"
    return f"{value:,.2f} {unit}"


def format_ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    if math.isinf(ratio):
        return "∞"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:,.0f}x"


def _cell(figure: Figure, column: str) -> str:
    value = figure.values.get(column)
    text = "—" if value is None else format_value(value, figure.unit)
    note = figure.notes.get(column)
    return f"{text} ({note})" if note else text


def results_table(figures: list[Figure]) -> list[str]:
    headers = ["Figure", *COLUMNS, *(f"{SUBJECT} vs {c}" for c in COMPARED)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for figure in figures:
        cells = [figure.label, *(_cell(figure, c) for c in COLUMNS)]
        cells += [format_ratio(figure.advantage(c)) for c in COMPARED]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(report: Report) -> str:
    """The markdown of `results.md`."""
    minutes, seconds = divmod(round(report.duration), 60)
    out = [
        "# fsmount benchmark results",
        "",
        f"Produced by `{report.command}` on {report.started}; the whole run took"
        f" {minutes} min {seconds:02d} s. Rerun it to replace this file.",
        "",
        "## Machine and versions",
        "",
        *(f"- {line}" for line in report.machine),
        *(f"- {line}" for line in report.versions),
        "",
        "## What was measured",
        "",
        *(f"- {line}" for line in report.method),
        "",
        "## Results",
        "",
        "Ratios are fsmount's advantage: above 1x means fsmount did better (more MiB/s, less"
        " time, fewer bytes, less memory); below 1x means it did worse. Notes in brackets are"
        " what the loopback server served during that measurement.",
        "",
        *results_table(report.figures),
        "",
        "## Targets",
        "",
        "| Target | Measured | Met |",
        "|---|---|---|",
    ]
    for target in report.targets:
        verdict = {True: "yes", False: "**no**", None: "not measured"}[target.met]
        out.append(f"| {target.goal} | {target.measured} | {verdict} |")
    if report.notes:
        out += ["", "## Notes", "", *(f"- {line}" for line in report.notes)]
    return "\n".join(out) + "\n"
