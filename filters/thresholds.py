"""Score thresholds, applied when pairs are read: a pair passes when every named score is >= its threshold."""
from __future__ import annotations

import math
from collections.abc import Mapping


def passes(scores: Mapping[str, float], thresholds: Mapping[str, float | None]) -> tuple[bool, list[str]]:
    """Return (kept, reasons). A threshold of None is off; a missing or NaN score fails, never passes."""
    reasons = []
    for name, minimum in thresholds.items():
        if minimum is None:
            continue
        value = scores.get(name)
        if value is None:
            reasons.append(f"{name}: missing")
        elif not math.isfinite(value):
            reasons.append(f"{name}: {value}")
        elif value < minimum:
            reasons.append(f"{name}: {value:.4f} < {minimum}")
    return not reasons, reasons


def judge(scores: Mapping[str, float | str], thresholds: Mapping[str, float | None]) -> tuple[bool, list[str]]:
    """`passes`, with each failure on an undefined score followed by the scorer's recorded `nan_reason`."""
    kept, reasons = passes(scores, thresholds)
    recorded = scores.get("nan_reason", "")
    why = dict(part.split(": ", 1) for part in recorded.split("; ") if ": " in part)
    return kept, [f"{reason} ({why[name]})" if (name := reason.split(":")[0]) in why else reason for reason in reasons]
