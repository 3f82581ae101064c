"""A student judged against the toy world's ground truth, beside its teacher: both edit the same held-out renders
(`evaluation.ground_truth.toy_set`), and each edit is scored against the true edit by PSNR, LPIPS and the benchmark's
correct-edit rule. `student / teacher` is the share of the teacher's quality the distillation kept; the headline is
the ratio of correct-edit rates.

The teacher is the generation run's own editor (its recorded `config.yaml`: model, editor, task) editing the renders
as real inputs, through its inversion, as the editor benchmark runs it. Its edits depend only on that config and the
scenes, so they are made once and kept in RUN_DIR/ground_truth/teacher-<digest>.pt for every later validation and
evaluation of a student of that run.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from datagen.editors.base import EditBatch
from distill.losses import build_lpips
from evaluation.ground_truth import RULE, TASK_EDITS, BenchmarkSet, correct_edits, region_psnr, toy_set

log = logging.getLogger(__name__)
METRICS = ("correct", "psnr", "lpips")  # per pair, against the true edit: rule (0/1), PSNR in dB on [0, 1], LPIPS
HIGHER_IS_BETTER = {"correct": True, "psnr": True, "lpips": False}

Translator = Callable[[Tensor], Tensor]  # B x 3 x H x W in [-1, 1] -> its edits, same layout


def truth_lpips() -> nn.Module:
    """The LPIPS of the toy world's metric preset (conf/metrics/toy.yaml): the shipped linear heads on a random VGG
    trunk drawn from seed 0, the one the editor benchmark and evaluate.py draw, so their LPIPS columns agree."""
    return build_lpips(pretrained=False, seed=0)


def truth_metrics(edited: Tensor, benchmark_set: BenchmarkSet, lpips: nn.Module, rows: slice = slice(None)) -> dict[str, Tensor]:
    """Per pair of `rows`: correct (the correct-edit rule, 0 or 1), psnr and lpips against the true edit; `edited`
    B x 3 x H x W in [0, 1] at the set's size."""
    edited, truth = edited.float().cpu(), benchmark_set.truth[rows]
    device = next(lpips.parameters()).device
    with torch.no_grad():
        distance = lpips((edited * 2 - 1).to(device), (truth * 2 - 1).to(device)).flatten().cpu()
    return {"correct": correct_edits(edited, benchmark_set, rows).float(), "psnr": region_psnr(edited, truth),
            "lpips": distance}


def means(columns: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-metric means; PSNR over the finite values (identical images give inf), inf if every one is."""
    summary = {}
    for name, values in columns.items():
        finite = values[torch.isfinite(values)]
        summary[name] = float(finite.mean()) if len(finite) else float(values.mean())
    return summary


@dataclass
class StudentScore:
    """Means per metric of the student's and the teacher's edits of the same renders, and `ratio` = student / teacher
    of each (for LPIPS, lower is better: a ratio above 1 is worse)."""

    task: str
    pairs: int
    student: dict[str, float]
    teacher: dict[str, float]

    @property
    def ratio(self) -> dict[str, float]:
        return {name: self.student[name] / self.teacher[name] if self.teacher[name] else float("nan") for name in METRICS}

    def table(self) -> list[str]:
        """A markdown table: one row per metric, student | teacher | student / teacher."""
        lines = [f"| {self.task}, {self.pairs} held-out renders vs true edits | student | teacher | student / teacher |",
                 "|---|---:|---:|---:|"]
        labels = {"correct": "correct-edit rate ↑", "psnr": "PSNR (dB) ↑", "lpips": "LPIPS ↓"}
        for name in METRICS:
            lines.append(f"| {labels[name]} | {self.student[name]:.3f} | {self.teacher[name]:.3f} | {self.ratio[name]:.3f} |")
        return lines

    def as_dict(self) -> dict:
        return {"task": self.task, "pairs": self.pairs, "student": self.student, "teacher": self.teacher, "ratio": self.ratio}


class StudentTruth:
    """One task's held-out renders, their true edits and the teacher's edits of them, ready to score students."""

    def __init__(self, benchmark_set: BenchmarkSet, teacher_edits: Tensor, lpips: nn.Module | None = None,
                 batch_size: int = 64):
        if teacher_edits.shape != benchmark_set.truth.shape:
            raise ValueError(f"teacher edits {tuple(teacher_edits.shape)} do not match the set's true edits "
                             f"{tuple(benchmark_set.truth.shape)}")
        self.set, self.batch_size = benchmark_set, batch_size
        self.lpips = lpips if lpips is not None else truth_lpips()
        self.teacher = self.measure(teacher_edits)

    @classmethod
    def from_run(cls, run_dir: str | Path, n: int = 64, seed: int = 0, device: str = "auto", batch_size: int = 64,
                 cache_dir: str | Path | None = "~/.cache/pairforge") -> StudentTruth:
        """The renders of generation run `run_dir`'s task, and its teacher's edits of them (made once, then cached in
        the run; `cache_dir` is where the teacher's edit direction is cached, as in generate.py)."""
        run = OmegaConf.load(Path(run_dir) / "config.yaml")
        if run.task.name not in TASK_EDITS:
            raise ValueError(f"task {run.task.name!r} has no ground truth (toy world tasks: {', '.join(TASK_EDITS)})")
        benchmark_set = toy_set(OmegaConf.to_container(run.task, resolve=True), n, seed, run.model.resolution)
        edits = cached_teacher_edits(Path(run_dir), run, benchmark_set, seed, device, batch_size, cache_dir)
        return cls(benchmark_set, edits, batch_size=batch_size)

    def measure(self, edited: Tensor) -> dict[str, Tensor]:
        """Per-pair metrics of edits (N x 3 x H x W in [0, 1]) of every pair of the set."""
        parts = [truth_metrics(edited[rows], self.set, self.lpips, rows) for rows in self.set.batches(self.batch_size)]
        return {name: torch.cat([part[name] for part in parts]) for name in METRICS}

    @torch.no_grad()
    def edits_of(self, student: Translator, device: torch.device | str = "cpu") -> Tensor:
        """The student's edits of the set's renders, in [0, 1] at the set's size: outputs of another size (a student of
        another resolution, which resizes its inputs as evaluate.py's `Student` does) are resized back, bicubic."""
        outputs = []
        for rows in self.set.batches(self.batch_size):
            images = (self.set.images[rows] * 2 - 1).to(device)
            outputs.append(student(images).float().cpu())
        edited = torch.cat(outputs)
        size = self.set.images.shape[-2:]
        if edited.shape[-2:] != size:
            edited = nn.functional.interpolate(edited, size=size, mode="bicubic", antialias=True, align_corners=False)
        return ((edited + 1) / 2).clamp(0, 1)

    def score(self, student: Translator, device: torch.device | str = "cpu") -> StudentScore:
        """The student's means beside the teacher's on the same renders."""
        return self.score_edits(self.edits_of(student, device))

    def score_edits(self, edited: Tensor) -> StudentScore:
        return StudentScore(self.set.name, len(self.set), means(self.measure(edited)), means(self.teacher))


def teacher_digest(run: DictConfig, n: int, seed: int) -> str:
    """What the teacher's edits of the renders depend on: the run's model, editor and task, and the scenes drawn."""
    recorded = {part: OmegaConf.to_container(run[part], resolve=True) for part in ("model", "editor", "task")}
    text = json.dumps(recorded | {"n": n, "seed": seed}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def cached_teacher_edits(run_dir: Path, run: DictConfig, benchmark_set: BenchmarkSet, seed: int, device: str,
                         batch_size: int, cache_dir: str | Path | None) -> Tensor:
    """The teacher's edits of the set (N x 3 x H x W in [0, 1]), from RUN_DIR/ground_truth/ or made and saved there."""
    path = run_dir / "ground_truth" / f"teacher-{teacher_digest(run, len(benchmark_set), seed)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    log.info("the teacher (%s) edits %d held-out renders of %s, once: %s", run.editor._target_.rsplit(".", 1)[-1],
             len(benchmark_set), benchmark_set.name, path)
    edits = teacher_edits(run, benchmark_set, device, batch_size, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(edits, temporary)
    temporary.replace(path)  # whole or absent: a killed run leaves no half file
    return edits


def teacher_edits(run: DictConfig, benchmark_set: BenchmarkSet, device: str, batch_size: int,
                  cache_dir: str | Path | None) -> Tensor:
    """The run's editor on the set's renders as real inputs (captions as source prompts, the task's target prompts
    for editors that sample with them), built as the generation worker builds it."""
    from datagen.backbone import load_backbone  # the diffusion stack, only when the teacher must run
    from datagen.directions import edit_direction
    from datagen.editors import build_editor

    backbone = load_backbone(run.model, device)
    editor = build_editor(run.editor, backbone, run.model.resolution, lambda: edit_direction(backbone, run.task, cache_dir))
    edits = []
    for rows in benchmark_set.batches(batch_size):
        targets = benchmark_set.target_prompts[rows] if editor.uses_target_prompts else None
        batch = EditBatch(benchmark_set.seeds[rows], benchmark_set.prompts[rows], benchmark_set.images[rows], targets)
        edits.append(editor.edit(batch).edited.float().cpu())
    return torch.cat(edits)


def write_truth_report(score: StudentScore, folder: Path) -> Path:
    """ground_truth.md (the table and the rule) and ground_truth.json (the same numbers) in `folder`; returns the .md."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ground_truth.json").write_text(json.dumps(score.as_dict(), indent=2) + "\n")
    path = folder / "ground_truth.md"
    path.write_text("\n".join([f"# {score.task}: student and teacher against the true edits", "", *score.table(), "",
                               f"Correct edit: {RULE}.", ""]))
    return path
