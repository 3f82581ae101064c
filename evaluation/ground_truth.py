"""The toy world's ground truth for editor benchmarks: held-out scenes rendered as inputs, the same scenes rendered
with the task's attribute changed as their true edits, and a correct-edit rule that needs nothing but the two.

A true edit is the input scene with one attribute of its object changed and every other number of the scene (place,
size, colour tint, stripe angle, background) kept, so it differs from the input only inside the union of the two
renders' object masks (tested). Each task's source prompt is the scene's true caption; its target prompt comes from
the task's own `prompt_edit` rule, and equals the true edit's caption (tested).

Correct-edit rule: an edit is correct when the true edit is the render nearest to it (L2 over every pixel in [0, 1])
among the true edit and every scene one property of its object away from it: each other shape, each other colour,
stripes and the dot each toggled, the other drawing style (outline or filled), and the scene without the object.

It is a nearest-neighbour reading of which scene the edit depicts, so it needs no model, and no scorer's blind spots
enter the benchmark that judges the scorers. The input is one of those scenes (the true edit with the task's
property set back), so returning it is never correct; nor is doing the task's edit and also changing the object's
shape or colour (a filled black circle for an outlined blue star), deleting the object, or moving it away (nearest:
the scene without it); the true edit always is. The renders differ only inside their object masks, so the background
away from every candidate's object adds the same to every distance and cannot decide; an edit that repaints it is
judged by the background columns, not here.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from datagen.prompts import PromptEdit
from evaluation.compose import task_config
from toyworld.render import render
from toyworld.world import COLOURS, SHAPES, Scenes, captions, sample_scenes

DRAW_CHUNK = 256  # scenes drawn per round: a fixed size, so the first n inputs are the same for any larger n


@dataclass(frozen=True)
class AttributeEdit:
    """A task's change to a scene: `attribute` (a `Scenes` field; per object ones act on the first object) goes from
    `before` to `after`; inputs are scenes that have `before` and every value of `requires`."""

    attribute: str
    before: int | bool
    after: int | bool
    requires: tuple[tuple[str, int | bool], ...] = ()

    def applies(self, scenes: Scenes) -> np.ndarray:
        """(N,) True where the scene can be this task's input."""
        wanted = ((self.attribute, self.before), *self.requires)
        return np.logical_and.reduce([_first_object(scenes, name) == value for name, value in wanted])

    def apply(self, scenes: Scenes) -> Scenes:
        """A copy of `scenes` with the attribute set to `after`, nothing else changed."""
        edited = scenes[np.arange(len(scenes))]
        _first_object(edited, self.attribute)[:] = self.after
        return edited


def _first_object(scenes: Scenes, name: str) -> np.ndarray:
    """The first object's values of a per-object field (N x 2 ...), or a per-scene field itself; a view, writable."""
    values = getattr(scenes, name)
    return values[:, 0] if values.ndim == 2 else values


PROPERTY_NAMES = {"shape": "shape", "colour": "colour", "striped": "stripes", "dot": "dot", "outline": "style"}
"""The `Scenes` field -> the name of the property it holds, in the report."""
CANDIDATE_KINDS = ("true_edit", "input", *PROPERTY_NAMES.values(), "removed")
"""What a candidate of the rule is: the true edit, the input, the true edit with one property changed, without the object."""


def one_property_away(scenes: Scenes) -> list[tuple[str, Scenes]]:
    """The correct-edit rule's wrong answers to each scene, with the property each changes: copies with one property
    of the first object changed (each other shape and colour, stripes, dot and the drawing style toggled; every copy
    differs from its scene on every row), and the scene without the object ("removed")."""
    away = []
    for name, levels in (("shape", len(SHAPES)), ("colour", len(COLOURS))):
        for shift in range(1, levels):
            changed = scenes[np.arange(len(scenes))]
            _first_object(changed, name)[:] = (_first_object(scenes, name) + shift) % levels
            away.append((PROPERTY_NAMES[name], changed))
    for name in ("striped", "dot", "outline"):
        changed = scenes[np.arange(len(scenes))]
        _first_object(changed, name)[:] = ~_first_object(scenes, name)
        away.append((PROPERTY_NAMES[name], changed))
    removed = scenes[np.arange(len(scenes))]
    removed.present[:, 0] = False
    return away + [("removed", removed)]


CIRCLE, SQUARE = SHAPES.index("circle"), SHAPES.index("square")
TASK_EDITS: dict[str, AttributeEdit] = {
    "circle2square": AttributeEdit("shape", CIRCLE, SQUARE),
    "plain2striped": AttributeEdit("striped", False, True),
    "circle2circle_dot": AttributeEdit("dot", False, True, requires=(("shape", CIRCLE),)),
    "outline2filled": AttributeEdit("outline", True, False),
}


@dataclass
class BenchmarkSet:
    """The inputs every editor of a benchmark edits, as one group of the report (a toy task, or PIE-Bench).

    `images` B x 3 x H x W in [0, 1]; `edit_masks` B x H x W bool, the region PIE-Bench's metrics treat as edited;
    `truth` the true edits (None where unknown: real data) and `alternatives` the correct-edit rule's candidates;
    `words` per pair the (source, target) words of the word-only edit direction; `task` the task config (None for
    PIE-Bench, whose texts are per pair)."""

    name: str
    keys: list[str]
    images: Tensor
    prompts: list[str]
    target_prompts: list[str]
    seeds: list[int]
    edit_masks: Tensor
    words: list[tuple[str, str] | None]
    task: dict | None = None
    truth: Tensor | None = None
    alternatives: Tensor | None = None  # B x K x 3 x H x W: the correct-edit rule's candidate renders
    truth_index: int = 0  # the true edit's index among them
    alternative_kinds: list[str] | None = None  # per candidate, one of CANDIDATE_KINDS
    meta: list[dict] = field(default_factory=list)  # per pair, for pairs.jsonl

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int) -> list[slice]:
        return [slice(start, min(start + batch_size, len(self))) for start in range(0, len(self), batch_size)]


def held_out_inputs(edit: AttributeEdit, n: int, rng: np.random.Generator, size: int) -> Scenes:
    """`n` held-out single-object scenes (descriptions the toy models never trained on) that can be `edit`'s inputs."""
    found: Scenes | None = None
    while found is None or len(found) < n:
        drawn = sample_scenes(DRAW_CHUNK, rng, size, held_out="only")
        drawn = drawn[edit.applies(drawn)]
        found = drawn if found is None else found.concat(drawn)
    return found[np.arange(n)]


def object_region(masks: Tensor) -> Tensor:
    """Coverage masks (..., H, W in [0, 1]) -> bool: every pixel the object touches, anti-aliased edge included."""
    return masks > 0


def toy_scenes(name: str, n: int, seed: int, size: int) -> tuple[Scenes, Scenes]:
    """Task `name`'s input scenes and their true edits. They depend on (seed, task name) only, not on which other
    tasks run."""
    if name not in TASK_EDITS:
        raise ValueError(f"no ground truth for task {name!r}: the toy world's tasks are {', '.join(TASK_EDITS)}")
    edit = TASK_EDITS[name]
    scenes = held_out_inputs(edit, n, np.random.default_rng([seed, zlib.crc32(name.encode())]), size)
    return scenes, edit.apply(scenes)


def toy_set(task: dict, n: int, seed: int, size: int) -> BenchmarkSet:
    """Task `task`'s inputs and true edits, rendered (`toy_scenes`), with their prompts and the rule's candidates."""
    name = task["name"]
    scenes, truth_scenes = toy_scenes(name, n, seed, size)
    images, masks = render(scenes)
    truth, truth_masks = render(truth_scenes)
    # the true edit first (truth_index 0), then its wrong neighbours; the one that is the input is named so
    kinds, renders = ["true_edit"], [truth]
    for kind, candidate in one_property_away(truth_scenes):
        image = render(candidate)[0]
        kinds.append("input" if torch.equal(image, images) else kind)
        renders.append(image)
    prompts = captions(scenes)
    rule = PromptEdit.from_task(task)
    meta = [{"true_caption": text} for text in captions(truth_scenes)]
    return BenchmarkSet(
        name=name, keys=[f"{name}-{i:04d}" for i in range(n)], images=images, prompts=prompts,
        target_prompts=[rule.target(prompt) for prompt in prompts], seeds=[seed + i for i in range(n)],
        edit_masks=object_region(masks[:, 0]) | object_region(truth_masks[:, 0]),
        words=[(task["source_word"], task["target_word"])] * n, task=task, truth=truth,
        alternatives=torch.stack(renders, dim=1), truth_index=0, alternative_kinds=kinds, meta=meta)


def toy_sets(tasks: Sequence[str], n: int, seed: int, size: int) -> list[BenchmarkSet]:
    """One set per task of conf/task/ (`source=toy`'s `tasks`)."""
    return [toy_set(task_config(name), n, seed, size) for name in tasks]


def region_psnr(images: Tensor, references: Tensor, region: Tensor | None = None) -> Tensor:
    """Per-pair PSNR in dB of images in [0, 1] over the pixels of `region` (B x H x W bool; None = all): the MSE is
    the mean over those pixels only. inf for identical images, nan for an empty region."""
    squared = (images.float() - references.float()).square().mean(1)  # B x H x W, mean over channels
    if region is None:
        region = torch.ones_like(squared, dtype=torch.bool)
    counts = region.flatten(1).sum(1)
    mse = (squared * region).flatten(1).sum(1) / counts.clamp_min(1)
    values = 10 * torch.log10(1 / mse)
    return torch.where(counts > 0, values, torch.nan)


def nearest_alternative(edited: Tensor, alternatives: Tensor) -> Tensor:
    """(B,) index of the candidate render (B x K x 3 x H x W) nearest to each edit in L2; -1 for a non-finite edit."""
    distances = (alternatives.float() - edited.float()[:, None]).flatten(2).square().sum(2)  # B x K
    nearest = distances.argmin(1)
    return torch.where(torch.isfinite(edited).flatten(1).all(1), nearest, -1)


def correct_edits(edited: Tensor, benchmark_set: BenchmarkSet, rows: slice = slice(None)) -> Tensor:
    """(B,) bool: the correct-edit rule for the edits of the set's pairs `rows`."""
    return nearest_alternative(edited, benchmark_set.alternatives[rows]) == benchmark_set.truth_index


RULE = ("an edit is correct when the true edit is the render nearest to it (L2 over all pixels in [0, 1]) among the true "
        "edit and every scene one property of its object away from it (each other shape and colour; stripes, the dot and "
        "the outline style toggled; the object removed), the input being one of them")
