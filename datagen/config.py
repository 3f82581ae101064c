"""Hydra/OmegaConf glue shared by the entry points."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent


def register_resolvers() -> None:
    """`${repo:toyworld/weights}` -> an absolute path inside the repository, whatever the cwd."""
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda rel: str(REPO_ROOT / rel))


register_resolvers()
