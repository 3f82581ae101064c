"""Configs composed from conf/ the way the entry points compose them, for code that needs several at once (an
editor benchmark builds many editors and tasks, each exactly as `python generate.py editor=... task=...` would)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from datagen.config import REPO_ROOT

CONF = REPO_ROOT / "conf"


@contextmanager
def config_search() -> Iterator[None]:
    """Hydra's config search over conf/: the running app's (an entry point's) if there is one, else a temporary one."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            yield


def generate_config(overrides: list[str]) -> DictConfig:
    """`python generate.py OVERRIDES`'s composed config."""
    with config_search():
        return compose(config_name="generate", overrides=overrides)


def task_config(name: str) -> DictConfig:
    """conf/task/NAME.yaml, as generate.py composes it."""
    return generate_config([f"task={name}"]).task
