"""An editor benchmark's result as files, in OUT/:

    report.md                 the ranking (every row over all sets), then per set one row per editor (and per
                              reference) for every metric group
    report.json               the same numbers unscaled, the precision/recall curves, the editors and their commands;
                              costs (seconds, the machine's) under "cost", apart from the numbers fixed seeds decide
    pairs.jsonl               every pair's values, to sort or plot anew
    config.yaml               the resolved config
    structure_vs_clip.png     Structure Dist against CLIP Acc, one point per editor (the paper's figure), per set
    correct_vs_cost.png       ground truth: correct-edit rate against seconds per pair, one point per editor
    grids/SET.png             rows input / true edit / each editor, on the set's first pairs
    pr/SET.png                ground truth: precision/recall of each thresholded filter score, the task's threshold marked
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from omegaconf import OmegaConf
from torchvision.utils import make_grid

from evaluation.ground_truth import RULE

if TYPE_CHECKING:
    from evaluation.editor_benchmark import BenchmarkResult, Columns, Row, SetResult

PADDING = 1  # pixels between the pictures of a grid
MARKERS = "os^Dv<>pP*Xh"
Summary = dict[str, dict[str, float | None]]


@dataclass(frozen=True)
class Column:
    """A table column: the per-pair column `source` summarised `how` (mean | percent of ones | percent positive)."""

    key: str
    label: str
    source: str
    how: str
    higher_is_better: bool
    scale: float = 1.0  # the markdown shows value x scale (PIE-Bench's reported units); the JSON keeps the value
    decimals: int = 3


GROUPS: dict[str, tuple[Column, ...]] = {
    "ground_truth": (
        Column("correct", "correct %", "gt_correct", "percent", True, decimals=1),
        Column("psnr", "PSNR", "gt_psnr", "mean", True, decimals=2),
        Column("lpips", "LPIPS", "gt_lpips", "mean", False),
        Column("bg_psnr", "BG PSNR", "gt_bg_psnr", "mean", True, decimals=2),
    ),
    "nearest": tuple(Column(kind, label, f"nearest_{kind}", "percent", kind == "true_edit", decimals=1) for kind, label in (
        ("true_edit", "true edit"), ("input", "input"), ("shape", "other shape"), ("colour", "other colour"),
        ("stripes", "stripes toggled"), ("dot", "dot toggled"), ("style", "style toggled"), ("removed", "object removed"))),
    "paper": (
        Column("clip_acc", "CLIP Acc %", "paper_clip_margin", "positive", True, decimals=1),
        Column("structure_dist", "Structure Dist", "paper_structure_dist", "mean", False, decimals=4),
        Column("bg_lpips", "BG LPIPS", "paper_bg_lpips", "mean", False),
    ),
    "pie_bench": (
        Column("structure", "Structure x10^3", "pie_structure", "mean", False, 1e3, 2),
        Column("bg_psnr", "BG PSNR", "pie_bg_psnr", "mean", True, decimals=2),
        Column("bg_lpips", "BG LPIPS x10^3", "pie_bg_lpips", "mean", False, 1e3, 2),
        Column("bg_mse", "BG MSE x10^4", "pie_bg_mse", "mean", False, 1e4, 2),
        Column("bg_ssim", "BG SSIM x10^2", "pie_bg_ssim", "mean", True, 1e2, 2),
        Column("clip_whole", "CLIP whole", "pie_clip_whole", "mean", True, decimals=2),
        Column("clip_edited", "CLIP edited", "pie_clip_edited", "mean", True, decimals=2),
    ),
}
TITLES = {"ground_truth": "Ground truth", "nearest": "Nearest render (% of pairs): what the edits depict",
          "paper": "The paper's metrics", "pie_bench": "PIE-Bench's metrics"}

DEFINITIONS = f"""\
- **correct %** (ground truth): {RULE}.
- **Nearest render**: the rule's candidate each edit is nearest to, so a wrong edit says what it depicts instead: the
  input (no edit), the true edit with another shape or colour or with its stripes, dot or drawing style toggled (the
  task's own property toggled back is the input), or the scene without the object.
- **PSNR, LPIPS** (ground truth): the edit against the true edit, whole image; PSNR on [0, 1], LPIPS the paper metrics' (VGG).
- **BG PSNR** (ground truth): the edit against the input over the pixels outside the union of the input's and the true
  edit's object masks (the renderer's), where the true edit equals the input.
- **CLIP Acc, Structure Dist, BG LPIPS**: the paper's metrics as `evaluate.py` computes them (evaluation/metrics.py);
  on PIE-Bench CLIP Acc compares each pair's target and source prompts and BG LPIPS blanks the annotated region.
- **PIE-Bench's metrics** with its conventions (evaluation/pie_bench.py): 8-bit images; background metrics multiply both
  images by the background mask and compute on the whole image (nan for an empty region); PSNR / MSE / SSIM on
  [0, 1], data range 1; LPIPS squeeze; CLIP = max(100 cos, 0), edited = the edit x the edit mask; structure on the
  whole images. Toy world: the edit mask is the union of the two object masks; its models stand in for PIE-Bench's
  (conf/benchmark/pie_metrics/toy.yaml), so its values compare only with toy runs.
- **s/pair, CPU s/pair, UNet evals/pair**: the editor's own wall time per pair at the benchmark's batch size on this
  machine; the process's CPU time in the editor per pair (on a CPU at one thread, the wall time the editor takes on a
  core no other process uses); its single-sample UNet forwards per pair (inversion included).
- **kept %, precision, recall**: the pairs the task's thresholds keep (filters/, as generation scores them); precision =
  correct among kept, recall = kept among correct."""


def summarise_values(values: Sequence[float], how: str) -> float | None:
    """A column's summary over its pairs; nan values (undefined: an empty region, a diverged edit) are left out."""
    array = np.asarray(values, dtype=float)
    defined = array[~np.isnan(array)]
    if not len(defined):
        return None
    if how == "positive":
        return 100.0 * float((defined > 0).mean())
    return float(defined.mean()) * (100.0 if how == "percent" else 1.0)


def summarise(columns: Columns) -> Summary:
    """group -> column key -> value, for the groups there are per-pair `columns` of (one row's, on one set or pooled)."""
    summary: Summary = {}
    for group, group_columns in GROUPS.items():
        present = [c for c in group_columns if c.source in columns]
        if present:
            summary[group] = {c.key: summarise_values(columns[c.source], c.how) for c in present}
    if "filter_kept" in columns:
        summary["filters"] = filter_summary(columns)
    return summary


def filter_summary(columns: Columns) -> dict[str, float | None]:
    """kept %, and with ground truth precision % (correct among kept) and recall % (kept among correct)."""
    kept = np.asarray(columns["filter_kept"], dtype=bool)
    values: dict[str, float | None] = {"kept": 100.0 * float(kept.mean())}
    if "gt_correct" in columns:
        correct = np.asarray(columns["gt_correct"], dtype=bool)
        both = float((kept & correct).sum())
        values["precision"] = 100.0 * both / kept.sum() if kept.any() else None
        values["recall"] = 100.0 * both / correct.sum() if correct.any() else None
    return values


def cost_summary(row: Row, pairs: int) -> dict[str, float | int | None]:
    return {"seconds": round(row.seconds, 3), "s_per_pair": round(row.seconds / pairs, 4),
            "cpu_s_per_pair": round(row.cpu_seconds / pairs, 4), "unet_evals_per_pair": row.unet_evals}


def pr_curve(scores: Sequence[float], correct: Sequence[float]) -> dict[str, list[float]]:
    """Precision and recall of keeping the pairs whose score >= t, for every distinct finite score t (descending).
    A nan score is never kept (as filters.thresholds.passes), and still counts among the correct pairs it misses."""
    scores, correct = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
    finite = np.isfinite(scores)
    order = np.argsort(-scores[finite], kind="stable")
    ranked, hits = scores[finite][order], correct[finite][order]
    true_positives, kept = np.cumsum(hits), np.arange(1, len(ranked) + 1)
    last_of_value = np.r_[ranked[1:] != ranked[:-1], True] if len(ranked) else np.zeros(0, bool)
    total = correct.sum()
    return {"threshold": ranked[last_of_value].tolist(),
            "precision": (true_positives / kept)[last_of_value].tolist(),
            "recall": (true_positives / total if total else np.full(len(ranked), np.nan))[last_of_value].tolist()}


def at_threshold(scores: Sequence[float], correct: Sequence[float], threshold: float) -> dict[str, float | None]:
    scores, correct = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
    kept = np.nan_to_num(scores, nan=-np.inf) >= threshold
    both = float((kept & correct).sum())
    return {"threshold": threshold, "precision": both / kept.sum() if kept.any() else None,
            "recall": both / correct.sum() if correct.any() else None}


def best_f1(curve: dict[str, list[float]]) -> dict[str, float] | None:
    precision, recall = np.asarray(curve["precision"]), np.asarray(curve["recall"])
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    if not len(f1) or np.isnan(f1).all():
        return None
    i = int(np.nanargmax(f1))
    return {"threshold": curve["threshold"][i], "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i])}


def filter_curves(result: SetResult) -> dict[str, dict]:
    """Per thresholded score of the task, pooled over the editors' pairs: the curve, the task's threshold, best F1."""
    editors = result.editors
    if not editors or "gt_correct" not in editors[0].columns or "filter_kept" not in editors[0].columns:
        return {}
    correct = [value for row in editors for value in row.columns["gt_correct"]]
    curves = {}
    for name, threshold in result.thresholds.items():
        if threshold is None or f"filter_{name}" not in editors[0].columns:
            continue
        scores = [value for row in editors for value in row.columns[f"filter_{name}"]]
        curve = pr_curve(scores, correct)
        curves[name] = {"task_threshold": at_threshold(scores, correct, threshold), "best_f1": best_f1(curve), "curve": curve}
    return curves


def json_safe(value):
    """nan -> None, +-inf -> "inf" / "-inf", floats rounded to 6 decimals; containers recursively."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else round(value, 6)
    return value


def format_value(value: float | None, column: Column | None = None, decimals: int = 3) -> str:
    if value is None:
        return "n/a"
    scale, decimals = (column.scale, column.decimals) if column is not None else (1.0, decimals)
    return "inf" if math.isinf(value) else f"{value * scale:.{decimals}f}"


def row_name(row: Row) -> str:
    return f"*{row.name}*" if row.reference else row.name


def group_table(group: str, rows: Sequence[Row], summaries: dict[str, Summary], with_cost: bool = False,
                pairs: int = 0) -> list[str]:
    """One metric group's markdown table over `rows` (those that have it), with s/pair and UNet evals/pair over
    `pairs` pairs if `with_cost`."""
    rows = [row for row in rows if group in summaries[row.name]]
    if not rows:
        return []
    present = [c for c in GROUPS[group] if c.key in summaries[rows[0].name][group]]
    header = [f"{c.label} {'↑' if c.higher_is_better else '↓'}" for c in present] + (["s/pair ↓", "UNet evals/pair"] if with_cost else [])
    lines = [f"### {TITLES[group]}", "", "| editor | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for row in rows:
        cells = [format_value(summaries[row.name][group][c.key], c) for c in present]
        if with_cost:
            cost = cost_summary(row, pairs)
            cells += ["-", "-"] if row.reference else [f"{cost['s_per_pair']:.3f}", str(cost["unet_evals_per_pair"])]
        lines.append(f"| {row_name(row)} | " + " | ".join(cells) + " |")
    return lines + [""]


def set_tables(result: SetResult, summaries: dict[str, Summary]) -> list[str]:
    """The set's markdown: one table per metric group, rows = references then editors; the cost beside the ground
    truth (the paper's metrics without it)."""
    lines: list[str] = []
    first = summaries[result.rows[0].name]
    cost_group = "ground_truth" if "ground_truth" in first else "paper"
    for group in GROUPS:
        lines += group_table(group, result.rows, summaries, with_cost=group == cost_group, pairs=len(result.set))
    filtered = [row for row in result.editors if "filters" in summaries[row.name]]
    if filtered:
        kept = ", ".join(f"{name} >= {value:g}" for name, value in result.thresholds.items() if value is not None)
        has_truth = "precision" in summaries[filtered[0].name]["filters"]
        header = ["kept %"] + (["precision %", "recall %"] if has_truth else [])
        lines += [f"### Filters ({kept})", "", "| editor | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
        for row in filtered:
            values = summaries[row.name]["filters"]
            keys = ["kept"] + (["precision", "recall"] if has_truth else [])
            lines.append(f"| {row.name} | " + " | ".join(format_value(values[k], decimals=1) for k in keys) + " |")
        lines.append("")
    return lines


def curve_lines(curves: dict[str, dict]) -> list[str]:
    if not curves:
        return []
    def percent(value: float | None) -> str:
        return format_value(None if value is None else 100 * value, decimals=1)

    lines = ["| score | task threshold | precision % | recall % | best-F1 threshold | precision % | recall % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in curves.items():
        task, best = entry["task_threshold"], entry["best_f1"] or {}
        cells = [f"{task['threshold']:g}", percent(task["precision"]), percent(task["recall"]),
                 format_value(best.get("threshold")), percent(best.get("precision")), percent(best.get("recall"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


RANKED = (("ground_truth", "correct"), ("ground_truth", "psnr"), ("ground_truth", "lpips"), ("ground_truth", "bg_psnr"),
          ("paper", "clip_acc"), ("paper", "structure_dist"))
"""The ranking's columns (group, key), where a row has them."""
COLUMNS = {(group, column.key): column for group, columns in GROUPS.items() for column in columns}


def pooled_columns(result: BenchmarkResult, name: str) -> Columns:
    """Row `name`'s per-pair columns over the pairs of every set, in set order."""
    columns: Columns = {}
    for s in result.sets:
        for row in s.rows:
            if row.name == name:
                for key, values in row.columns.items():
                    columns.setdefault(key, []).extend(values)
    return columns


def ranking(result: BenchmarkResult) -> dict[str, Summary]:
    """Every row summarised over the pairs of all sets together (precision and recall count the kept and the correct
    pairs of every set), in ranking order: the editors by correct-edit rate (CLIP Acc without ground truth), best first,
    ties in the config's order; then the references."""
    group, key = ("ground_truth", "correct") if has_truth(result) else ("paper", "clip_acc")
    rows = result.sets[0].rows
    summaries = {row.name: summarise(pooled_columns(result, row.name)) for row in rows}
    editors = sorted((row.name for row in rows if not row.reference), key=lambda name: -(summaries[name][group][key] or 0.0))
    return {name: summaries[name] for name in editors + [row.name for row in rows if row.reference]}


def ranking_table(result: BenchmarkResult, ranked: dict[str, Summary]) -> list[str]:
    """The ranking as markdown: the RANKED columns, the cost, and the filters (kept, precision, recall)."""
    rows = {row.name: row for row in result.sets[0].rows}
    first = next(iter(ranked.values()))
    present = [COLUMNS[group, key] for group, key in RANKED if key in first.get(group, {})]
    groups = [group for group, key in RANKED if key in first.get(group, {})]
    filters = ["kept", "precision", "recall"] if "precision" in first.get("filters", {}) else ["kept"] if "filters" in first else []
    header = [f"{c.label} {'↑' if c.higher_is_better else '↓'}" for c in present] + ["s/pair ↓", "CPU s/pair ↓", "UNet evals/pair"]
    header += [f"{name} %" for name in filters]
    lines = ["| editor | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for name, summary in ranked.items():
        row = rows[name]
        cells = [format_value(summary[group][c.key], c) for group, c in zip(groups, present)]
        cells += ["-"] * 3 if row.reference else [f"{seconds_per_pair(result, name):.3f}", f"{seconds_per_pair(result, name, cpu=True):.3f}",
                                                   str(row.unet_evals)]
        cells += [format_value(summary["filters"][key], decimals=1) for key in filters]
        lines.append(f"| {row_name(row)} | " + " | ".join(cells) + " |")
    return lines + [""]


def summary_table(result: BenchmarkResult, summaries: dict[str, dict[str, Summary]]) -> list[str]:
    """Rows x sets: the correct-edit rate where there is ground truth, else CLIP Acc; and s/pair over all sets."""
    group, key, label = ("ground_truth", "correct", "correct edits (%)") if has_truth(result) else ("paper", "clip_acc", "CLIP Acc (%)")
    names = [s.set.name for s in result.sets]
    lines = [f"## Summary: {label}", "", "| editor | " + " | ".join(names) + " | mean | s/pair |", "|---|" + "---:|" * (len(names) + 2)]
    for row in result.sets[0].rows:
        values = [summaries[name][row.name][group][key] for name in names]
        mean = float(np.mean(values)) if None not in values else None
        cost = "-" if row.reference else f"{seconds_per_pair(result, row.name):.3f}"
        lines.append(f"| {row_name(row)} | " + " | ".join(format_value(v, decimals=1) for v in values)
                     + f" | {format_value(mean, decimals=1)} | {cost} |")
    return lines + [""]


def has_truth(result: BenchmarkResult) -> bool:
    return all(s.set.truth is not None for s in result.sets)


def seconds_per_pair(result: BenchmarkResult, name: str, cpu: bool = False) -> float:
    """Editor `name`'s seconds per pair over every set: wall time, or with `cpu` the process's CPU time."""
    seconds = sum(row.cpu_seconds if cpu else row.seconds for s in result.sets for row in s.rows if row.name == name)
    return seconds / sum(len(s.set) for s in result.sets)


def write_report(result: BenchmarkResult, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    summaries = {s.set.name: {row.name: summarise(row.columns) for row in s.rows} for s in result.sets}
    curves = {s.set.name: filter_curves(s) for s in result.sets}
    ranked = ranking(result)
    pictures = write_pictures(result, summaries, ranked, curves, out)
    OmegaConf.save(OmegaConf.create(result.config), out / "config.yaml")

    cfg = result.config
    document = {
        "model": cfg["model"]["name"], "source": {k: v for k, v in cfg["source"].items() if k != "_target_"},
        "steps": cfg["steps"], "batch_size": cfg["batch_size"], "correct_edit_rule": RULE,
        "editors": {e.name: {"label": e.label, "command": e.command, "direction": e.direction,
                             "editor": OmegaConf.to_container(e.cfg, resolve=True)} for e in result.entries},
        "sets": {s.set.name: {"pairs": len(s.set), "thresholds": s.thresholds,
                              "rows": {row.name: {"label": row.label, "reference": row.reference, "non_finite": row.non_finite,
                                                  **summaries[s.set.name][row.name]} for row in s.rows},
                              "filter_curves": curves[s.set.name]} for s in result.sets},
        "ranking": ranked,
        "pictures": pictures,
        "cost": {"seconds": round(result.seconds, 1), "cpu_seconds": round(result.cpu_seconds, 1), "device": cfg["device"],
                 "threads": torch.get_num_threads(),
                 "editors": {row.name: {"s_per_pair": round(seconds_per_pair(result, row.name), 4),
                                        "cpu_s_per_pair": round(seconds_per_pair(result, row.name, cpu=True), 4),
                                        "unet_evals_per_pair": row.unet_evals} for row in result.sets[0].editors},
                 "sets": {s.set.name: {row.name: cost_summary(row, len(s.set)) for row in s.editors} for s in result.sets}},
    }
    (out / "report.json").write_text(json.dumps(json_safe(document), indent=1) + "\n")
    write_pairs(result, out / "pairs.jsonl")

    threads = torch.get_num_threads()
    rows = {row.name: row for row in result.sets[0].rows}
    lines = [
        "# Editor benchmark", "",
        f"{len(result.entries)} editors on {len(result.sets)} sets "
        f"({', '.join(f'{s.set.name}: {len(s.set)}' for s in result.sets)} pairs), "
        f"model `{cfg['model']['name']}`, {cfg['steps']} steps, batch {cfg['batch_size']}; "
        f"{result.seconds / 60:.1f} min wall, {result.cpu_seconds / 60:.1f} min of CPU time, on this machine "
        f"({threads} thread{'s' if threads > 1 else ''}).", "",
        "## Ranking", "", "Each row over the pairs of every set together; the editors best first.", "",
        *ranking_table(result, ranked),
        *group_table("nearest", [rows[name] for name in ranked], ranked),
        *summary_table(result, summaries),
    ]
    for s in result.sets:
        lines += [f"## {s.set.name}", "", *set_tables(s, summaries[s.set.name])]
        if curves[s.set.name]:
            lines += ["Filters against ground truth, each score alone, pooled over the editors:", "", *curve_lines(curves[s.set.name]),
                      f"![precision/recall]({pictures['pr'][s.set.name]})", ""]
        lines += [f"![{s.set.name}]({pictures['grids'][s.set.name]})", ""]
    lines += ["## Pictures", "", f"![Structure Dist vs CLIP Acc]({pictures['structure_vs_clip']})", ""]
    if "correct_vs_cost" in pictures:
        lines += [f"![correct edits vs cost]({pictures['correct_vs_cost']})", ""]
    references = "; ".join(f"*{row.name}*: {row.label}" for row in result.sets[0].rows if row.reference)
    lines += ["## Editors", "", *(f"- **{e.name}**: {e.label}. `{e.command}`"
                                  + (f" (direction: {e.direction})" if e.editor_class.uses_direction else "") for e in result.entries), "",
              f"Reference rows (*italics*): {references}.", "",
              "## Definitions", "", DEFINITIONS, ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def write_pairs(result: BenchmarkResult, path: Path) -> None:
    with open(path, "w") as stream:
        for s in result.sets:
            bset = s.set
            for row in s.rows:
                for i, key in enumerate(bset.keys):
                    record = {"set": bset.name, "row": row.name, "key": key, "prompt": bset.prompts[i],
                              "target_prompt": bset.target_prompts[i], "seed": bset.seeds[i],
                              **(bset.meta[i] if bset.meta else {}), **{name: values[i] for name, values in row.columns.items()}}
                    stream.write(json.dumps(json_safe(record)) + "\n")


def write_pictures(result: BenchmarkResult, summaries: dict[str, dict[str, Summary]], ranked: dict[str, Summary],
                   curves: dict[str, dict], out: Path) -> dict:
    pictures: dict = {"grids": {}, "pr": {}}
    for s in result.sets:
        pictures["grids"][s.set.name] = f"grids/{s.set.name}.png"
        write_grid(s, out / pictures["grids"][s.set.name])
        if curves[s.set.name]:
            (out / "pr").mkdir(exist_ok=True)
            pictures["pr"][s.set.name] = f"pr/{s.set.name}.png"
            write_pr_figure(s.set.name, curves[s.set.name], out / pictures["pr"][s.set.name])
    pictures["structure_vs_clip"] = "structure_vs_clip.png"
    write_scatter(result, summaries, out / pictures["structure_vs_clip"])
    if has_truth(result):
        pictures["correct_vs_cost"] = "correct_vs_cost.png"
        write_cost_figure(result, ranked, out / pictures["correct_vs_cost"])
    return pictures


def write_grid(result: SetResult, path: Path) -> None:
    """Rows: the input, the true edit (where known), then each editor; columns: the set's first pairs."""
    bset = result.set
    shown = len(result.rows[0].shown)
    labelled = [("input", bset.images[:shown])] + ([("true edit", bset.truth[:shown])] if bset.truth is not None else [])
    labelled += [(row.name, row.shown) for row in result.editors]
    side = bset.images.shape[-1]
    cells = torch.cat([images.float().clamp(0, 1) for _, images in labelled])
    mosaic = make_grid(cells, nrow=shown, padding=PADDING, pad_value=1)
    # small worlds are drawn large, pixel for pixel
    zoom = max(1, 64 // side)
    mosaic = F.interpolate(mosaic[None], scale_factor=zoom, mode="nearest")[0]
    figure = Figure(figsize=(2.5 + 0.9 * shown, 0.5 + 0.9 * len(labelled)), layout="constrained")
    axis = figure.subplots()
    axis.imshow(mosaic.permute(1, 2, 0).nan_to_num(0).numpy(), interpolation="nearest")
    step = (side + PADDING) * zoom
    axis.set_yticks([PADDING * zoom + side * zoom / 2 + i * step for i in range(len(labelled))], [name for name, _ in labelled], fontsize=8)
    axis.set_xticks([PADDING * zoom + side * zoom / 2 + i * step for i in range(shown)], bset.keys[:shown], fontsize=6, rotation=90)
    axis.tick_params(length=0)
    axis.set_title(bset.name)
    figure.savefig(path, dpi=100)


def editor_styles(result: BenchmarkResult) -> dict[str, dict[str, object]]:
    """A colour and marker per editor, the same in every picture: editors that land on one point stay apart in the legend."""
    colours = colormaps["tab20"]
    return {row.name: {"color": colours(i % 20), "marker": MARKERS[i % len(MARKERS)]} for i, row in enumerate(result.sets[0].editors)}


def add_legend(figure: Figure, styles: dict[str, dict[str, object]]) -> None:
    handles = [Line2D([], [], linestyle="", markersize=6, label=name, **style) for name, style in styles.items()]
    figure.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False)


def write_scatter(result: BenchmarkResult, summaries: dict[str, dict[str, Summary]], path: Path) -> None:
    """The paper's figure: Structure Dist (lower: layout kept) against CLIP Acc (higher: edit recognised), per set."""
    styles = editor_styles(result)
    columns = min(2, len(result.sets))
    rows = -(-len(result.sets) // columns)
    figure = Figure(figsize=(4.2 * columns + 2.6, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis in axes[len(result.sets):]:
        axis.set_axis_off()
    for axis, s in zip(axes, result.sets):
        for row in s.editors:
            paper = summaries[s.set.name][row.name]["paper"]
            if paper["clip_acc"] is not None and paper["structure_dist"] is not None:
                axis.scatter(paper["clip_acc"], paper["structure_dist"], s=24, alpha=0.85, **styles[row.name])
        axis.set_xlim(-4, 104)
        axis.set_xlabel("CLIP Acc (%) ↑")
        axis.set_ylabel("Structure Dist ↓")
        axis.set_title(s.set.name, fontsize=10)
        axis.grid(alpha=0.3)
    add_legend(figure, styles)
    figure.savefig(path, dpi=90)


def write_cost_figure(result: BenchmarkResult, ranked: dict[str, Summary], path: Path) -> None:
    """Correct-edit rate over every set's pairs against seconds per pair, one point per editor."""
    styles = editor_styles(result)
    figure = Figure(figsize=(7.5, 3.8), layout="constrained")
    axis = figure.subplots()
    for name, style in styles.items():
        axis.scatter(seconds_per_pair(result, name), ranked[name]["ground_truth"]["correct"], s=30, alpha=0.85, **style)
    axis.set_xlabel("seconds per pair on this machine ↓")
    axis.set_ylabel("correct edits (%), all sets ↑")
    axis.grid(alpha=0.3)
    add_legend(figure, styles)
    figure.savefig(path, dpi=90)


def write_pr_figure(name: str, curves: dict[str, dict], path: Path) -> None:
    figure = Figure(figsize=(5, 4.2), layout="constrained")
    axis = figure.subplots()
    for score, entry in curves.items():
        curve = entry["curve"]
        line, = axis.plot(curve["recall"], curve["precision"], label=score)
        task = entry["task_threshold"]
        if task["precision"] is not None and task["recall"] is not None:
            axis.scatter([task["recall"]], [task["precision"]], color=line.get_color(), zorder=3,
                         label=f"{score} >= {task['threshold']:g} (the task's)")
    axis.set_xlabel("recall (kept among correct)")
    axis.set_ylabel("precision (correct among kept)")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_title(f"{name}: each filter score alone")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
