"""All scores of a batch of (input, edited) pairs, one flat dict per pair, ready for the sample's json.

The scorer models come from the diffusion model's preset (`cfg.model.scorers`: real, tiny or toy); the
texts and object words from the task. Every score is always computed: thresholds are applied when pairs
are read (`filters.thresholds.passes`), so changing one never means scoring again. A score that is
undefined for a pair is NaN, explained under `nan_reason`, and fails any threshold set on it.
Score names and formulas: filters/README.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import Tensor

from filters.clip_gain import ClipEncoder, ClipScorer
from filters.loading import MissingModelError
from filters.segmentation import ClipSegSegmenter, SegmentationScorer


class Scorer(Protocol):
    undefined_reasons: Mapping[str, str]

    def __call__(self, inputs: Tensor, edited: Tensor) -> dict[str, Tensor]: ...


class PairScorer:
    """`PairScorer(inputs, edited)`: float tensors B x 3 x H x W in [0, 1], any device -> B dicts of scores."""

    def __init__(self, scorers: Sequence[Scorer]):
        self.scorers = list(scorers)

    @torch.no_grad()
    def __call__(self, inputs: Tensor, edited: Tensor) -> list[dict[str, float | str]]:
        edited = edited.to(inputs.device)
        columns: dict[str, list[float]] = {}
        reasons: dict[str, str] = {}
        for scorer in self.scorers:
            columns.update({name: values.float().tolist() for name, values in scorer(inputs, edited).items()})
            reasons.update(scorer.undefined_reasons)
        rows = []
        for i in range(len(inputs)):
            row: dict[str, float | str] = {name: values[i] for name, values in columns.items()}
            undefined = [f"{name}: {reasons.get(name, 'not finite')}" for name, value in row.items() if not math.isfinite(value)]
            if undefined:
                row["nan_reason"] = "; ".join(undefined)
            rows.append(row)
        return rows


def segmentation_words(task_cfg: Mapping[str, Any]) -> tuple[str, str] | None:
    """The words the segmenter looks for: `task.seg_words` {source, target} if set (null = no segmentation),
    else the task's source and target words."""
    words = task_cfg.get("seg_words", {"source": task_cfg["source_word"], "target": task_cfg["target_word"]})
    return None if words is None else (words["source"], words["target"])


def load_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """`hydra.utils.instantiate`, letting a missing model's one-line error through instead of Hydra's wrapper."""
    try:
        return instantiate(cfg)
    except InstantiationException as error:
        if isinstance(error.__cause__, MissingModelError):
            raise error.__cause__ from None
        raise


def build_scorer(scorers_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype = torch.float32) -> PairScorer:
    """Instantiate the preset's CLIP model and segmenter (`_target_` each) on `device` and bind them to the task."""
    clip = load_model(scorers_cfg["clip"]).to(device, dtype).eval()
    needs_segmenter = segmentation_words(task_cfg) is not None
    segmenter = load_model(scorers_cfg["segmenter"]).to(device, dtype).eval() if needs_segmenter else None
    return task_scorer(task_cfg, clip, segmenter)


def task_scorer(task_cfg: Mapping[str, Any], clip: ClipEncoder, segmenter: ClipSegSegmenter | None) -> PairScorer:
    """The task's scorers on loaded models (one pair of models can serve many tasks); `segmenter` may be None for a
    task without segmentation words."""
    scorers: list[Scorer] = []
    words = segmentation_words(task_cfg)
    if words is not None:
        scorers.append(SegmentationScorer(segmenter, *words))
    scorers.append(ClipScorer(clip, task_cfg["source_text"], task_cfg["target_text"]))
    return PairScorer(scorers)
