"""One readable error for a scorer model that is not on this machine, instead of a hub stack trace.

It is a `ModelUnavailableError`, the error entry points already report in one line for the SD model;
only the advice differs (a scorer's local copy is set in the scorer preset, not with `model.path`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from datagen.runtime import ModelUnavailableError


class ModelWrapper(nn.Module):
    """A wrapped pretrained model that reports where its weights live, for the inputs it is handed."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class MissingModelError(ModelUnavailableError):
    """A scorer model could be neither found locally nor downloaded."""


@contextmanager
def explain_missing(model: str, errors: tuple[type[BaseException], ...] = (OSError,)) -> Iterator[None]:
    """Turn a failed load of `model` (hub id, open_clip tag or path) into one MissingModelError naming it."""
    try:
        yield
    except errors as error:
        # The hub library reports a mistyped local path as an invalid repository id: say what is wrong instead.
        missing_path = model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists()
        first_line = next(iter(str(error).strip().splitlines()), type(error).__name__)
        cause = "no such file or folder" if missing_path else first_line
        raise MissingModelError(
            f"Scorer model {model!r} is not available ({cause}). Download it once on a machine that can reach "
            "the model hub (it is then cached), point the scorer preset at a local copy "
            "(e.g. model.scorers.segmenter.name_or_path=/models/clipseg), or score offline with model=tiny "
            "(random scorers, for tests) or model=toy (the toy world's trained scorers)."
        ) from error
