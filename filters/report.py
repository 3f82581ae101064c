"""What the thresholds do to a run: `DIR/filter_report.md`, acceptance counts per filter and overall,
and a histogram of every score with its threshold drawn (`DIR/filter_report/<score>.png`)."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from filters.apply import Judged
from filters.thresholds import passes


@dataclass(frozen=True)
class FilterCounts:
    """One threshold's effect on its own: `undefined` pairs (NaN or missing score) are among the `failed`,
    `decisive` counts the pairs this filter alone rejects."""

    name: str
    minimum: float
    passed: int
    failed: int
    undefined: int
    decisive: int


def count_filters(verdicts: Sequence[Judged], thresholds: Mapping[str, float | None]) -> list[FilterCounts]:
    counts = []
    for name, minimum in thresholds.items():
        if minimum is None:
            continue
        alone = [passes(v.scores, {name: minimum})[0] for v in verdicts]
        undefined = sum(not _finite(v.scores.get(name)) for v in verdicts)
        decisive = sum(not ok and len(v.reasons) == 1 for ok, v in zip(alone, verdicts))
        counts.append(FilterCounts(name, minimum, sum(alone), len(alone) - sum(alone), undefined, decisive))
    return counts


def write_report(run_dir: Path, verdicts: Sequence[Judged], thresholds: Mapping[str, float | None]) -> Path:
    """Write the report and its histograms; returns the report's path."""
    kept = sum(v.kept for v in verdicts)
    total = len(verdicts)
    shards = len({v.shard for v in verdicts})
    lines = [
        f"# Filter report: {run_dir.name}",
        "",
        f"**{kept} of {total} pairs kept** ({_percent(kept, total)}) from {shards} shards, written to `filtered/`.",
        "",
        "| filter | keeps | passed | failed | of which undefined | rejected by this filter alone |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in count_filters(verdicts, thresholds):
        lines.append(f"| {c.name} | >= {c.minimum:g} | {c.passed} | {c.failed} | {c.undefined} | {c.decisive} |")
    lines.append(f"| **all** | | {kept} | {total - kept} | | |")
    off = [name for name, minimum in thresholds.items() if minimum is None]
    if off:
        lines += ["", f"Thresholds off: {', '.join(off)}."]

    undefined = Counter(v.scores["nan_reason"] for v in verdicts if "nan_reason" in v.scores)
    if undefined:
        lines += ["", "## Undefined scores", ""]
        lines += [f"- {n} pairs: {reason}" for reason, n in undefined.most_common()]

    figures = run_dir / "filter_report"
    figures.mkdir(exist_ok=True)
    lines += ["", "## Score distributions", "", "Undefined (NaN) values are left out; the dashed line is the threshold.", ""]
    for name in _score_names(verdicts):
        _histogram(name, [v.scores.get(name) for v in verdicts], thresholds.get(name), figures / f"{name}.png")
        lines.append(f"![{name}](filter_report/{name}.png)")

    report = run_dir / "filter_report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _histogram(name: str, values: list, minimum: float | None, path: Path) -> None:
    finite = [value for value in values if _finite(value)]
    figure = Figure(figsize=(5, 3), layout="constrained")
    axes = figure.subplots()
    # Bins over the values and the threshold together: a threshold far from the data must not squash the bars.
    span = finite + ([minimum] if minimum is not None else [])
    axes.hist(finite, bins=40, range=(min(span), max(span)) if span else None, color="tab:blue")
    if minimum is not None:
        passed = sum(value >= minimum for value in finite)
        axes.axvline(minimum, color="tab:red", linestyle="--", label=f">= {minimum:g}: {passed} of {len(values)} pass")
        axes.legend(loc="best")
    axes.set_title(f"{name} ({len(values) - len(finite)} undefined)" if len(finite) < len(values) else name)
    axes.set_xlabel(name)
    axes.set_ylabel("pairs")
    figure.savefig(path, dpi=100)


def _score_names(verdicts: Sequence[Judged]) -> list[str]:
    names: dict[str, None] = {}
    for v in verdicts:
        names.update((name, None) for name, value in v.scores.items() if not isinstance(value, str))
    return list(names)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "no pairs"
