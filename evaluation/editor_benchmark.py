"""`python benchmark.py`'s work: every editor entry of `cfg.editors` edits the same inputs, and each edit is measured
against the ground truth (toy world), with the paper's metrics, with PIE-Bench's, by its cost, and by the filters.

An entry names a conf/editor/ config and its overrides; the editor config is composed exactly as
`python generate.py editor=NAME editor.KEY=VALUE` composes it, and built with the generation worker's own call
(`build_editor`). Editors see real inputs (the inversion path): the images with their source prompts, target prompts
from the task's `prompt_edit` rule for editors that sample with them, the task's edit direction for those that take
one. Reference rows (the input itself, the true edit, the true edit through the VAE) are measured by the same code,
so every column has its floor and ceiling beside the editors.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from datagen.backbone import Backbone, load_backbone
from datagen.directions import edit_direction, mean_embedding
from datagen.editors import build_editor
from datagen.editors.base import EditBatch, Editor
from datagen.runtime import resolve_device
from distill.losses import build_lpips
from evaluation.benchmark_report import write_report
from evaluation.compose import generate_config
from evaluation.evaluator import EditMetrics
from evaluation.ground_truth import CANDIDATE_KINDS, BenchmarkSet, nearest_alternative, region_psnr
from evaluation.metrics import ClipMargin, KeySelfSimilarity, background_lpips, structure_distance
from evaluation.pie_bench import PieBenchMetrics
from filters.clip_gain import ClipEncoder
from filters.segmentation import ClipSegSegmenter
from filters.score import PairScorer, load_model, segmentation_words, task_scorer
from filters.thresholds import passes

log = logging.getLogger("pairforge.benchmark")
Columns = dict[str, list[float]]
DIRECTIONS = ("banks", "words")


class BenchmarkError(ValueError):
    """An editor entry or the benchmark's config cannot be run as written."""


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar, as it would be typed after `editor.KEY=`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    text = str(value)
    plain = text.replace("_", "").replace("-", "").replace(".", "").replace("/", "").isalnum()
    return text if plain else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class EditorEntry:
    """One row of the benchmark: `editor` (a conf/editor/ name) with `overrides`, composed into `cfg`."""

    name: str
    label: str
    editor: str
    overrides: dict[str, Any]
    direction: str
    cfg: DictConfig

    @property
    def command(self) -> str:
        """The generation command whose editor this row measures."""
        return "python generate.py " + " ".join(editor_arguments(self.editor, self.overrides))

    @property
    def editor_class(self) -> type[Editor]:
        return get_class(self.cfg._target_)


def editor_arguments(editor: str, overrides: Mapping[str, Any]) -> list[str]:
    """generate.py's command-line arguments that select `editor` with `overrides`."""
    return [f"editor={editor}"] + [f"editor.{key}={hydra_value(value)}" for key, value in overrides.items()]


def editor_entries(editors_cfg: DictConfig) -> list[EditorEntry]:
    """The entries of `cfg.editors` in order, each editor config composed as generate.py composes it."""
    entries = []
    for name, entry in OmegaConf.to_container(editors_cfg, resolve=True).items():
        direction = entry.get("direction", "banks")
        if direction not in DIRECTIONS:
            raise BenchmarkError(f"editor entry {name!r}: direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
        overrides = dict(entry.get("overrides") or {})
        arguments = editor_arguments(entry["editor"], overrides)
        try:
            cfg = generate_config(arguments).editor
        except Exception as error:  # Hydra's errors for an unknown editor or key: say which entry made it
            raise BenchmarkError(f"editor entry {name!r} ({' '.join(arguments)}): {error}") from None
        entries.append(EditorEntry(name, entry.get("label", name), entry["editor"], overrides, direction, cfg))
    if not entries:
        raise BenchmarkError("no editor entries: the benchmark/editors list (conf/benchmark/editors/*.yaml) names none")
    return entries


def word_direction(backbone: Backbone, source_word: str, target_word: str) -> Tensor:
    """The paper's "word only" ablation: the embedding of the target word alone minus that of the source word
    (each encoded as a one-sentence bank), 1 x 77 x D."""
    return mean_embedding(backbone, [target_word]) - mean_embedding(backbone, [source_word])


def prompt_direction(backbone: Backbone, sources: Sequence[str], targets: Sequence[str]) -> Tensor:
    """Per pair, the embedding of its target prompt minus that of its source prompt, B x 77 x D: PIE-Bench's
    pix2pix-zero runner's direction (one-sentence banks) for data without sentence banks."""
    with torch.no_grad():
        return (backbone.encode_text(list(targets)).float() - backbone.encode_text(list(sources)).float()).cpu()


@dataclass
class Row:
    """One editor (or reference) on one set: per-pair `columns`, its cost, and the edits shown in the set's grid."""

    name: str
    label: str
    reference: bool
    command: str | None = None
    columns: Columns = field(default_factory=dict)
    seconds: float = 0.0  # the editor's own wall time, over the set
    cpu_seconds: float = 0.0  # the process's CPU time in the editor's calls
    unet_evals: int | None = None
    non_finite: int = 0
    shown: Tensor | None = None


@dataclass
class SetResult:
    set: BenchmarkSet
    thresholds: dict[str, float | None]
    rows: list[Row] = field(default_factory=list)

    @property
    def editors(self) -> list[Row]:
        return [row for row in self.rows if not row.reference]


@dataclass
class BenchmarkResult:
    config: dict
    entries: list[EditorEntry]
    sets: list[SetResult]
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # this process's CPU time, every thread's: the wall time on free cores at one thread


class MetricModels:
    """The metric models of one model preset, loaded once and bound to each set in turn. A model that two metric
    groups name with the same config (model=toy: one CLIP for the filters, the paper's CLIP Acc and PIE-Bench's CLIP
    score) is loaded once."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        preset = cfg.model.name
        if preset not in cfg.metrics or preset not in cfg.pie_metrics:
            raise BenchmarkError(f"no metric preset for model {preset!r}: add it to metrics and pie_metrics in conf/benchmark.yaml")
        self.device, self.scorers_cfg = device, cfg.model.scorers
        self._loaded: dict[str, nn.Module] = {}
        self.clip: ClipEncoder = self.load(cfg.model.scorers.clip)
        self.self_similarity: KeySelfSimilarity = self.load(cfg.metrics[preset].structure)
        # offline presets draw LPIPS's VGG trunk at random: the same one in every run (as evaluate.py)
        self.lpips: nn.Module = build_lpips(cfg.metrics[preset].lpips_pretrained_vgg, seed=0).to(device)
        self.pie = PieBenchMetrics.build(cfg.pie_metrics[preset], device, self.load)

    def load(self, model_cfg: DictConfig) -> nn.Module:
        """The model of `model_cfg` (a `_target_` config) on the device, in eval mode; the same object for equal configs."""
        key = json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True)
        if key not in self._loaded:
            self._loaded[key] = load_model(model_cfg).to(self.device).eval()
        return self._loaded[key]

    @property
    def segmenter(self) -> ClipSegSegmenter:
        """Loaded on first need: PIE-Bench and the style tasks never use it."""
        return self.load(self.scorers_cfg.segmenter)


class SetMeasure:
    """Every per-pair value of the benchmark for edits of one set's pairs."""

    def __init__(self, models: MetricModels, benchmark_set: BenchmarkSet):
        self.models, self.set = models, benchmark_set
        task = benchmark_set.task
        self.thresholds: dict[str, float | None] = dict(task["thresholds"]) if task is not None else {}
        if task is not None:
            words = segmentation_words(task)
            clip = ClipMargin(models.clip, task["source_text"], task["target_text"])
            self.paper = EditMetrics(clip, models.self_similarity, models.lpips, models.segmenter if words else None, words)
            # the filters exactly as generation scores pairs: its scorers on the same models, the task's texts and words
            self.scorer: PairScorer | None = task_scorer(task, models.clip, models.segmenter if words else None)
        else:
            self.paper, self.scorer = None, None

    @torch.no_grad()
    def __call__(self, rows: slice, edited: Tensor) -> Columns:
        bset, models = self.set, self.models
        inputs, masks, edited = bset.images[rows], bset.edit_masks[rows], edited.float().cpu()
        values: dict[str, Tensor] = {}
        if bset.truth is not None:
            truth = bset.truth[rows]
            nearest = nearest_alternative(edited, bset.alternatives[rows])
            values["gt_correct"] = (nearest == bset.truth_index).float()
            for kind in CANDIDATE_KINDS:  # which render each edit is nearest to: what a wrong edit depicts instead
                indices = torch.tensor([j for j, name in enumerate(bset.alternative_kinds) if name == kind], dtype=torch.long)
                values[f"nearest_{kind}"] = torch.isin(nearest, indices).float()
            values["gt_psnr"] = region_psnr(edited, truth)
            values["gt_lpips"] = models.lpips((edited * 2 - 1).to(models.device), (truth * 2 - 1).to(models.device)).flatten().cpu()
            values["gt_bg_psnr"] = region_psnr(edited, inputs, ~masks)
        values.update({f"paper_{name}": value for name, value in self.paper_metrics(rows, inputs, edited, masks).items()})
        pie = models.pie(inputs, edited, masks, bset.prompts[rows], bset.target_prompts[rows])
        values.update({f"pie_{name}": value for name, value in pie.items()})
        columns = {name: value.float().tolist() for name, value in values.items()}
        if self.scorer is not None:
            scores = self.scorer(inputs.to(models.device), edited.to(models.device))
            for name in scores[0]:
                if name != "nan_reason":
                    columns[f"filter_{name}"] = [float(row[name]) for row in scores]
            columns["filter_kept"] = [float(passes(row, self.thresholds)[0]) for row in scores]
        return columns

    def paper_metrics(self, rows: slice, inputs: Tensor, edited: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """clip_margin, structure_dist, bg_lpips. Without a task (PIE-Bench) the texts are each pair's prompts and the
        background is outside the annotated edit region."""
        if self.paper is not None:
            return self.paper.edit(inputs * 2 - 1, edited * 2 - 1)
        models, bset = self.models, self.set
        device = models.device
        sources, targets = bset.prompts[rows], bset.target_prompts[rows]
        margins = torch.cat([ClipMargin(models.clip, source, target)(edited[i : i + 1].to(device) * 2 - 1)
                             for i, (source, target) in enumerate(zip(sources, targets))])
        x, y = inputs.to(device) * 2 - 1, edited.to(device) * 2 - 1
        return {"clip_margin": margins, "structure_dist": structure_distance(models.self_similarity, y, x),
                "bg_lpips": background_lpips(models.lpips, y, x, masks.to(device))}


class EditorBenchmark:
    """The models, inputs and editor entries of one benchmark config; `run()` edits and measures everything."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self.entries = editor_entries(cfg.editors)  # composed first: a mistyped entry fails before any model loads
        self.device = resolve_device(cfg.device)
        self.backbone = load_backbone(cfg.model, cfg.device)
        self.resolution = cfg.model.resolution
        self.sets: list[BenchmarkSet] = instantiate(cfg.source, _partial_=True)(size=self.resolution)
        self.models = MetricModels(cfg, self.backbone.device)

    def direction(self, entry: EditorEntry, bset: BenchmarkSet, rows: slice) -> Tensor:
        """The edit direction for `entry`'s editor on the set's pairs `rows`: the task's (sentence banks or words),
        or per pair from its prompts (sets without a task)."""
        if bset.task is not None:
            if entry.direction == "banks":
                return edit_direction(self.backbone, bset.task, self.cfg.cache_dir)
            return word_direction(self.backbone, bset.task["source_word"], bset.task["target_word"])
        sources, targets = bset.prompts[rows], bset.target_prompts[rows]
        if entry.direction == "words":  # the blended words where the entry has them
            pairs = [words or prompts for words, prompts in zip(bset.words[rows], zip(sources, targets))]
            sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
        return prompt_direction(self.backbone, sources, targets)

    def references(self, bset: BenchmarkSet) -> list[tuple[str, str, Tensor]]:
        """(name, label, edits of every pair) of the reference rows."""
        def vae(images: Tensor) -> Tensor:
            parts = [self.backbone.decode_latents(self.backbone.encode_images((images[rows] * 2 - 1).to(self.backbone.device))).cpu()
                     for rows in bset.batches(self.cfg.batch_size)]
            return torch.cat(parts).float()

        if bset.truth is None:
            return [("input_vae", "the input through the VAE: what a latent editor keeps at best", vae(bset.images))]
        return [("input", "the input, unedited", bset.images),
                ("true_edit", "the true edit", bset.truth),
                ("true_edit_vae", "the true edit through the VAE: a latent editor's ceiling", vae(bset.truth))]

    def run_set(self, bset: BenchmarkSet) -> SetResult:
        measure = SetMeasure(self.models, bset)
        result = SetResult(bset, measure.thresholds)
        shown = slice(0, min(self.cfg.grid_pairs, len(bset)))
        for name, label, edits in self.references(bset):
            row = Row(name, label, reference=True, shown=edits[shown])
            for rows in bset.batches(self.cfg.batch_size):
                extend(row.columns, measure(rows, edits[rows]))
            result.rows.append(row)
        for entry in self.entries:
            result.rows.append(self.run_entry(entry, bset, measure, shown))
        return result

    def run_entry(self, entry: EditorEntry, bset: BenchmarkSet, measure: SetMeasure, shown: slice) -> Row:
        row = Row(entry.name, entry.label, reference=False, command=entry.command)
        # Without a task the direction is per pair: one editor per batch. Otherwise one editor serves every batch.
        def build(rows: slice) -> Editor:  # cache_dir: editors that keep reusable work (StyleDiffusion's inversions)
            return build_editor(entry.cfg, self.backbone, self.resolution, lambda: self.direction(entry, bset, rows), self.cfg.compile,
                                self.cfg.cache_dir)

        per_batch = entry.editor_class.uses_direction and bset.task is None
        editor = None if per_batch else build(slice(None))
        targets_used = entry.editor_class.uses_target_prompts
        grid = []
        for rows in bset.batches(self.cfg.batch_size):
            if per_batch:
                editor = build(rows)
            batch = EditBatch(bset.seeds[rows], bset.prompts[rows], bset.images[rows], bset.target_prompts[rows] if targets_used else None)
            cpu_start = time.process_time()
            result = editor.edit(batch)
            row.cpu_seconds += time.process_time() - cpu_start
            row.seconds += result.seconds
            row.unet_evals = result.unet_evals
            row.non_finite += int((~result.finite).sum())
            extend(row.columns, measure(rows, result.edited))
            grid.append(result.edited[: max(0, shown.stop - rows.start)])
        row.shown = torch.cat(grid)[shown].float()
        correct = row.columns.get("gt_correct")
        rate = f", correct {100 * sum(correct) / len(correct):.0f}%" if correct else ""
        log.info("%s on %s: %d pairs, %.3f s/pair%s", entry.name, bset.name, len(bset), row.seconds / len(bset), rate)
        return row

    def run(self) -> BenchmarkResult:
        start, cpu_start = time.perf_counter(), time.process_time()
        sets = [self.run_set(bset) for bset in self.sets]
        config = OmegaConf.to_container(self.cfg, resolve=True)
        return BenchmarkResult(config, self.entries, sets, time.perf_counter() - start, time.process_time() - cpu_start)


def extend(columns: Columns, values: Mapping[str, list[float]]) -> None:
    for name, value in values.items():
        columns.setdefault(name, []).extend(value)


def run(cfg: DictConfig) -> Path:
    """Run the benchmark of `cfg` and write its report into `cfg.out`; returns report.md."""
    benchmark = EditorBenchmark(cfg)
    result = benchmark.run()
    report = write_report(result, Path(cfg.out))
    pairs = sum(len(s.set) for s in result.sets)
    log.info("%d editors x %d pairs in %.0f s (%.0f s of CPU time) -> %s", len(result.entries), pairs, result.seconds,
             result.cpu_seconds, report)
    return report

