"""Teacher editors behind one interface (`base.Editor`), one file each, chosen with `editor=`:
pix2pix_zero, p2p (Prompt-to-Prompt), word_swap (DDIM + word swap), sdedit, stylediffusion."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from datagen.backbone import Backbone
from datagen.editors.base import Editor


def build_editor(editor_cfg: DictConfig, backbone: Backbone, resolution: int, direction: Callable[[], torch.Tensor],
                 compile: bool | Mapping[str, Any] = False, cache_dir: str | None = None) -> Editor:
    """The editor an `editor=` config describes, on `backbone`. `direction()` makes the task's edit direction; it is
    called only for the editors that take one (it costs the sentence banks' text encoding). `cache_dir` goes to the
    editors that keep reusable work there (StyleDiffusion's inversions); None: they keep none."""
    editor_class = get_class(editor_cfg._target_)
    extra: dict[str, Any] = {"direction": direction()} if editor_class.uses_direction else {}
    if editor_class.uses_cache_dir:
        extra["cache_dir"] = cache_dir
    # Partial first: instantiate would turn the Backbone dataclass into a config node.
    return instantiate(editor_cfg, _partial_=True)(backbone=backbone, resolution=resolution, compile=compile, **extra)
