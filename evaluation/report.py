"""One run's evaluation as files a person reads or looks at, in REPORT_DIR/<task>/:

    report.md      the table: one row per metric, teacher and student side by side
    report.json    the same numbers (and the run, thresholds, student, pair count)
    pairs.jsonl    every pair's values, to sort or plot anew
    cases/*.png    for each metric of each method, its worst and best pairs: input | teacher | student
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from evaluation.evaluator import RunEvaluation, RunEvaluator

METHODS = ("teacher", "student")
PADDING = 2  # pixels between the pictures of a case grid


@dataclass(frozen=True)
class Metric:
    """A report row: `column`'s per-pair values summarised for each of `methods` (None: not a per-pair metric)."""

    name: str
    label: str
    column: str | None
    higher_is_better: bool
    methods: tuple[str, ...] = METHODS
    decimals: int = 4


METRICS = (
    Metric("clip_acc", "CLIP Acc (%)", "clip_margin", True, decimals=1),
    Metric("structure_dist", "Structure Dist", "structure_dist", False),
    Metric("bg_lpips", "BG LPIPS", "bg_lpips", False),
    Metric("ns_lpips", "NS-LPIPS", "ns_lpips", False),
    Metric("lpips_to_teacher", "LPIPS to teacher", "lpips_to_teacher", False, ("student",)),
    Metric("l1_to_teacher", "L1 to teacher", "l1_to_teacher", False, ("student",)),
    Metric("psnr_to_teacher", "PSNR to teacher (dB)", "psnr_to_teacher", True, ("student",), decimals=2),
    Metric("images_per_second", "images/s", None, True, decimals=2),
)

DEFINITIONS = """\
- **CLIP Acc**: share of edits closer in CLIP to the target text than to the source text.
- **Structure Dist**: MSE between the last-layer key self-similarities of input and edit in a ViT (Tumanyan et al. 2022).
- **BG LPIPS**: LPIPS between input and edit with the object (the segmenter's source mask in the input or target mask in the edit) blanked in both; n/a for tasks without object words.
- **NS-LPIPS** (with `ns_lpips=true`): StyleDiffusion's LPIPS(AlexNet) between input and edit at 256 px, both weighted by 1 - the source word's cross-attention map over a DDIM inversion of the input (a soft background mask); n/a where the prompt lacks the word.
- **to teacher**: the student's output against the teacher's edit, both at the student's resolution (L1 and PSNR on [-1, 1]).
- **images/s**: teacher: pairs per second of wall time in the generation run (its manifest; one worker); student: its forward passes only, after three warm-up calls, batch as evaluated."""


def summarise(result: RunEvaluation) -> dict[str, dict[str, float | None]]:
    """metric name -> method -> value (None where undefined: no segmentation, or no pair had it)."""
    columns = {"teacher": result.teacher, "student": result.student}
    summary: dict[str, dict[str, float | None]] = {}
    for metric in METRICS:
        if metric.column is None:
            if result.images_per_second:
                summary[metric.name] = dict(result.images_per_second)
            continue
        values = {method: np.asarray(columns[method][metric.column], dtype=float) for method in metric.methods
                  if metric.column in columns[method]}
        if values:
            summary[metric.name] = {method: _summary(metric, column) for method, column in values.items()}
    return summary


def _summary(metric: Metric, values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None
    if metric.name == "clip_acc":  # the share of positive margins, in percent
        return 100.0 * float((finite > 0).mean())
    return float(finite.mean())


def markdown_table(summary: dict[str, dict[str, float | None]]) -> list[str]:
    methods = [method for method in METHODS if any(method in row for row in summary.values())]
    lines = ["| metric | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for metric in METRICS:
        if metric.name in summary:
            arrow = "↑" if metric.higher_is_better else "↓"
            row = summary[metric.name]
            cells = [format_value(row[method], metric.decimals) if method in row else "-" for method in methods]
            lines.append(f"| {metric.label} {arrow} | " + " | ".join(cells) + " |")
    return lines


def format_value(value: float | None, decimals: int) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


def write_report(evaluator: RunEvaluator, result: RunEvaluation, out_dir: Path, cases: int = 4) -> Path:
    """Write the task's report, its JSON, per-pair values and case grids under `out_dir`/<task>/; returns report.md."""
    task_dir = out_dir / result.task
    (task_dir / "cases").mkdir(parents=True, exist_ok=True)
    summary = summarise(result)
    grids = write_case_grids(evaluator, result, task_dir / "cases", cases)

    document = {
        "task": result.task,
        "run": str(result.run_dir),
        "pairs": len(result.keys),
        "thresholds": result.thresholds,
        "student": result.student_path,
        "metrics": summary,
        "cases": {name: str(path.relative_to(task_dir)) for name, path in grids.items()},
    }
    (task_dir / "report.json").write_text(json.dumps(document, indent=2) + "\n")
    with open(task_dir / "pairs.jsonl", "w") as stream:
        for i, key in enumerate(result.keys):
            row = {"key": key} | {method: {name: values[i] for name, values in columns.items()}
                                  for method, columns in (("teacher", result.teacher), ("student", result.student)) if columns}
            stream.write(json.dumps(row) + "\n")

    kept = ", ".join(f"{name} >= {minimum:g}" for name, minimum in result.thresholds.items() if minimum is not None)
    lines = [
        f"# Evaluation: {result.task}",
        "",
        f"{len(result.keys)} pairs of `{result.run_dir}` ({f'kept by {kept}' if kept else 'no thresholds'})"
        + (f"; student `{result.student_path}`." if result.student_path else "; no student."),
        "",
        *markdown_table(summary),
        "",
        DEFINITIONS,
        "",
        "## Worst and best cases",
        "",
        *(f"![{name}]({path.relative_to(task_dir)})" for name, path in grids.items()),
    ]
    report = task_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def write_case_grids(evaluator: RunEvaluator, result: RunEvaluation, folder: Path, cases: int) -> dict[str, Path]:
    """One PNG per (method, per-pair metric): its `cases` worst pairs, then its `cases` best."""
    rankings: dict[str, tuple[Metric, list[tuple[str, float]]]] = {}
    for method, columns in (("teacher", result.teacher), ("student", result.student)):
        for metric in METRICS:
            if metric.column in columns and method in metric.methods:
                finite = [(key, value) for key, value in zip(result.keys, columns[metric.column]) if math.isfinite(value)]
                if finite:
                    rankings[f"{method}_{metric.column}"] = (metric, _worst_and_best(finite, metric.higher_is_better, cases))
    shown = {key for _, ranked in rankings.values() for key, _ in ranked}
    images = evaluator.images(shown)
    grids = {}
    for name, (metric, ranked) in rankings.items():
        grids[name] = folder / f"{name}.png"
        _grid(name, ranked, images, grids[name])
    return grids


def _worst_and_best(values: Sequence[tuple[str, float]], higher_is_better: bool, cases: int) -> list[tuple[str, float]]:
    order: Callable[[tuple[str, float]], float] = lambda item: item[1] if higher_is_better else -item[1]
    ranked = sorted(values, key=order)  # worst first
    shown = min(cases, max(1, len(ranked) // 2))
    return ranked[:shown] + ranked[::-1][:shown]


def _grid(name: str, ranked: list[tuple[str, float]], images: dict[str, dict[str, Tensor]], path: Path) -> None:
    """One mosaic (rows: pairs, columns: input | teacher | student), labelled on its axes: a single imshow stays
    fast where a subplot per picture would not."""
    columns = list(next(iter(images.values())))
    side = max(picture.shape[-1] for row in images.values() for picture in row.values())
    # nearest-neighbour keeps a small student's or teacher's pixels visible next to a larger one
    cells = [F.interpolate(images[key][kind][None], size=(side, side), mode="nearest")[0] for key, _ in ranked for kind in columns]
    mosaic = make_grid(torch.stack(cells).clamp(-1, 1), nrow=len(columns), padding=PADDING, normalize=True, value_range=(-1, 1), pad_value=1)
    half = len(ranked) // 2
    figure = Figure(figsize=(1.2 + 1.5 * len(columns), 0.5 + 1.5 * len(ranked)), layout="constrained")
    axis = figure.subplots()
    axis.imshow(mosaic.permute(1, 2, 0).numpy(), interpolation="nearest")
    centres = [PADDING + side / 2 + i * (side + PADDING) for i in range(max(len(columns), len(ranked)))]
    axis.set_xticks(centres[: len(columns)], columns)
    axis.xaxis.tick_top()
    labels = [f"{'worst' if row < half else 'best'} {row % half + 1}\n{key}\n{value:.4g}" for row, (key, value) in enumerate(ranked)]
    axis.set_yticks(centres[: len(ranked)], labels, fontsize=8)
    axis.tick_params(length=0)
    axis.set_title(f"{name}: worst {half} (top), best {half} (bottom)")
    figure.savefig(path, dpi=100)
