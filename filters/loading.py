"""One readable error for a scorer model that is not on this machine, instead of a hub stack trace."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class MissingModelError(RuntimeError):
    """A scorer model could be neither found locally nor downloaded."""


@contextmanager
def explain_missing(model: str, errors: tuple[type[BaseException], ...] = (OSError,)) -> Iterator[None]:
    """Turn a failed load of `model` (hub id, open_clip tag or path) into one MissingModelError naming it."""
    try:
        yield
    except errors as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MissingModelError(
            f"Scorer model {model!r} is not available ({cause}). Download it once on a machine that can reach "
            "the model hub (it is then cached), point the scorer preset at a local copy "
            "(e.g. model.scorers.clip.name_or_path=/models/clip), or score offline with model=tiny "
            "(random scorers, for tests) or model=toy (the toy world's trained scorers)."
        ) from error
