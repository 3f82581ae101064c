"""Evaluating one generation run: the teacher's pairs, and optionally an exported student on the same inputs.

Pairs are read as the distillation reads them (`distill.data.PairStream`: the same thresholds, the same
held-out split by key), at the run's resolution. The student translates the inputs resized to its own
resolution; its edit metrics are taken against those resized inputs, and its distance to the teacher
against the teacher's edit resized the same way, so it is never judged on an upsampling it did not do.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datagen.shards import finished_shards
from distill.data import PairAugment, PairStream, recorded_thresholds, shard_urls
from distill.losses import build_lpips, psnr
from evaluation.metrics import ClipMargin, KeySelfSimilarity, background_lpips, l1_distance, structure_distance
from evaluation.ns_lpips import NSLPIPS
from filters.score import load_model, segmentation_words
from filters.segmentation import ClipSegSegmenter

Columns = dict[str, list[float]]
WARMUP_CALLS = 3


class EvaluationError(RuntimeError):
    """The run, the student or the metric presets cannot be evaluated as asked."""


class Student:
    """An exported TorchScript generator: B x 3 x H x W in [-1, 1] of any size in (resized to its resolution), its
    edits out. Counts the images it translates and the seconds its forward passes take, for images/s."""

    def __init__(self, module: torch.jit.ScriptModule, resolution: int, device: torch.device, path: Path | None = None):
        self.module, self.resolution, self.device, self.path = module, resolution, device, path
        self.images, self.seconds, self.warm = 0, 0.0, False

    @classmethod
    def load(cls, path: str | Path, device: torch.device) -> Student:
        path = Path(path).expanduser()
        if not path.is_file():
            raise EvaluationError(f"student {path} not found: pass an exported TorchScript generator (python export.py ...)")
        try:
            module = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as error:
            raise EvaluationError(f"student {path} is not a TorchScript file ({str(error).splitlines()[0]})") from None
        if not hasattr(module, "resolution"):
            raise EvaluationError(f"student {path} does not record its resolution (a models.comodgan.Generator has it)")
        return cls(module, int(module.resolution), device, path)

    def resize(self, images: Tensor) -> Tensor:
        return resize(images, self.resolution)

    @torch.no_grad()
    def translate(self, images: Tensor) -> Tensor:
        return self.module(self.resize(images).to(self.device))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """`translate`, timed."""
        images = self.resize(images).to(self.device)
        if not self.warm:
            # TorchScript's profiling executor profiles and optimises the graph during the first calls (measured:
            # 3 calls at 5 x a later call's time): keep that out of images/s
            for _ in range(WARMUP_CALLS):
                self.module(images)
            self.warm = True
        self.synchronize()
        start = time.perf_counter()
        outputs = self.module(images)
        self.synchronize()
        self.seconds += time.perf_counter() - start
        self.images += len(images)
        return outputs

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


def resize(images: Tensor, resolution: int) -> Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


class EditMetrics:
    """The metric models of one model preset, bound to one task's texts and object words."""

    def __init__(self, clip: ClipMargin, self_similarity: KeySelfSimilarity, lpips: nn.Module,
                 segmenter: ClipSegSegmenter | None, words: tuple[str, str] | None):
        self.clip, self.self_similarity, self.lpips, self.segmenter = clip, self_similarity, lpips, segmenter
        self.words = words

    @classmethod
    def build(cls, scorers_cfg: Mapping[str, Any], metrics_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any],
              device: torch.device) -> EditMetrics:
        """CLIP and the segmenter from the model preset's scorers (those the filters use), the ViT and LPIPS from
        the metric preset; tasks without object words (trees) get no segmenter, and no BG LPIPS."""
        words = segmentation_words(task_cfg)
        segmenter = load_model(scorers_cfg["segmenter"]).to(device).eval() if words else None
        clip = ClipMargin(load_model(scorers_cfg["clip"]).to(device).eval(), task_cfg["source_text"], task_cfg["target_text"])
        self_similarity = load_model(metrics_cfg["structure"]).to(device).eval()
        lpips = build_lpips(metrics_cfg["lpips_pretrained_vgg"], seed=0).to(device)  # offline presets: a random trunk
        return cls(clip, self_similarity, lpips, segmenter, words)

    @property
    def device(self) -> torch.device:
        return self.self_similarity.device

    @torch.no_grad()
    def edit(self, inputs: Tensor, edited: Tensor) -> dict[str, Tensor]:
        """clip_margin, structure_dist and bg_lpips of B edits of B inputs."""
        inputs, edited = inputs.to(self.device), edited.to(self.device)
        metrics = {"clip_margin": self.clip(edited), "structure_dist": structure_distance(self.self_similarity, edited, inputs)}
        if self.words is None:
            metrics["bg_lpips"] = torch.full((len(inputs),), torch.nan)
        else:
            source, target = self.words
            # the object is where the source word is in the input or the target word in the edit
            masks = self.segmenter.masks((torch.cat([inputs, edited]) + 1) / 2, [source] * len(inputs) + [target] * len(inputs))
            metrics["bg_lpips"] = background_lpips(self.lpips, edited, inputs, masks[: len(inputs)] | masks[len(inputs):])
        return metrics

    @torch.no_grad()
    def fidelity(self, outputs: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        """The student's distance to its teacher's edits."""
        outputs, teacher = outputs.to(self.device), teacher.to(self.device)
        return {
            "lpips_to_teacher": self.lpips(outputs, teacher).flatten().cpu(),
            "l1_to_teacher": l1_distance(outputs, teacher),
            "psnr_to_teacher": psnr(outputs, teacher).cpu(),
        }


@dataclass
class RunEvaluation:
    """Per-pair values of one run: `teacher` and `student` columns (metric name -> one value per key)."""

    task: str
    run_dir: Path
    thresholds: dict[str, float | None]
    student_path: str | None
    keys: list[str] = field(default_factory=list)
    teacher: Columns = field(default_factory=dict)
    student: Columns = field(default_factory=dict)
    images_per_second: dict[str, float] = field(default_factory=dict)  # method -> images/s where known


def teacher_images_per_second(run_dir: Path) -> float | None:
    """The editor's pairs per second in the generation run: its manifest's pairs over the wall time its workers
    spent on them (one worker's view, as generate.py reports it); None where the manifest holds no timings."""
    records = finished_shards(run_dir).values()
    pairs, seconds = sum(r.count for r in records), sum(r.seconds for r in records)
    return pairs / seconds if pairs and seconds > 0 else None


class RunEvaluator:
    """Evaluates the pairs of generation run `run_dir` that pass `thresholds` (None = those the run recorded)
    and belong to the split `holdout` (None = all, True/False = the distillation's held-out share or the rest);
    with `ns_lpips`, also StyleDiffusion's NS-LPIPS (it loads the run's diffusion model to invert every input)."""

    def __init__(self, run_dir: Path, metrics_presets: Mapping[str, Any], device: torch.device,
                 student_path: str | Path | None = None, thresholds: Mapping[str, float | None] | None = None,
                 holdout: bool | None = None, holdout_fraction: float = 0.02, batch_size: int = 16,
                 ns_lpips: bool = False):
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise EvaluationError(f"{config_path} not found: data.path must name generation output directories")
        self.run_dir, self.run, self.batch_size = run_dir, OmegaConf.load(config_path), batch_size
        preset = self.run.model.name
        if preset not in metrics_presets:
            raise EvaluationError(f"no metric preset for model {preset!r} (known: {', '.join(metrics_presets)}): "
                                  "add conf/metrics/<preset>.yaml and map the model to it in conf/evaluate.yaml")
        self.thresholds = recorded_thresholds(str(run_dir)) if thresholds is None else dict(thresholds)
        unchanged = PairAugment(self.run.model.resolution, crop_scale=(1.0, 1.0), flip=False)
        self.stream = PairStream(shard_urls(str(run_dir)), self.thresholds, unchanged, train=False,
                                 holdout=holdout, holdout_fraction=holdout_fraction)
        self.student = Student.load(student_path, device) if student_path is not None else None
        self.metrics = EditMetrics.build(self.run.model.scorers, metrics_presets[preset], self.run.task, device)
        self.ns_lpips = NSLPIPS.build(self.run.model, metrics_presets[preset]["ns_lpips"], device) if ns_lpips else None

    def batches(self) -> Iterator[dict]:
        """{"input", "target": B x 3 x R x R in [-1, 1], "key": B keys}, in shard order."""
        return iter(DataLoader(self.stream, batch_size=self.batch_size, num_workers=0))

    def evaluate(self) -> RunEvaluation:
        result = RunEvaluation(self.run.task.name, self.run_dir, self.thresholds, self.student and str(self.student.path))
        for batch in self.batches():
            result.keys += batch["key"]
            extend(result.teacher, self.metrics.edit(batch["input"], batch["target"]))
            if self.ns_lpips is not None:
                backgrounds = self.ns_lpips.backgrounds(batch["input"], batch["prompt"], batch["source_word"])
                extend(result.teacher, {"ns_lpips": self.ns_lpips.score(batch["input"], batch["target"], backgrounds)})
            if self.student is not None:
                outputs = self.student(batch["input"])
                extend(result.student, self.metrics.edit(self.student.resize(batch["input"]), outputs))
                extend(result.student, self.metrics.fidelity(outputs, self.student.resize(batch["target"])))
                if self.ns_lpips is not None:  # the input's mask, both compared at the mask's 256 px
                    extend(result.student, {"ns_lpips": self.ns_lpips.score(batch["input"], outputs, backgrounds)})
        if not result.keys:
            raise EvaluationError(f"no pair of {self.run_dir} passes the thresholds {self.thresholds} in the chosen split "
                                  "(pairs without scores pass none: score them with `python -m filters DIR`, or "
                                  "evaluate every pair with data.thresholds={})")
        teacher_speed = teacher_images_per_second(self.run_dir)
        if teacher_speed is not None:
            result.images_per_second["teacher"] = teacher_speed
        if self.student is not None:
            result.images_per_second["student"] = self.student.images_per_second
        return result

    @torch.no_grad()
    def images(self, keys: set[str]) -> dict[str, dict[str, Tensor]]:
        """The input, teacher edit and (with a student) student output of each of `keys`: a second pass, so that
        the first never holds more than a batch of images."""
        found: dict[str, dict[str, Tensor]] = {}
        for batch in self.batches():
            wanted = [i for i, key in enumerate(batch["key"]) if key in keys]
            if not wanted:
                continue
            inputs, targets = batch["input"][wanted], batch["target"][wanted]
            outputs = self.student.translate(inputs).cpu() if self.student else None
            for j, i in enumerate(wanted):
                found[batch["key"][i]] = {"input": inputs[j], "teacher": targets[j]} | ({"student": outputs[j]} if self.student else {})
        return found


def extend(columns: Columns, values: Mapping[str, Tensor]) -> None:
    for name, value in values.items():
        columns.setdefault(name, []).extend(value.tolist())
