"""Teacher editors behind one interface (`base.Editor`), one file each, chosen with `editor=`:
pix2pix_zero, p2p (Prompt-to-Prompt), word_swap (DDIM + word swap), sdedit."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from datagen.backbone import Backbone
from datagen.editors.base import Editor


def build_editor(editor_cfg: DictConfig, backbone: Backbone, resolution: int, direction: Callable[[], torch.Tensor],
                 compile: bool | Mapping[str, Any] = False) -> Editor:
    """The editor an `editor=` config describes, on `backbone`. `direction()` makes the task's edit direction; it is
    called only for the editors that take one (it costs the sentence banks' text encoding)."""
    extra = {"direction": direction()} if get_class(editor_cfg._target_).uses_direction else {}
    # Partial first: instantiate would turn the Backbone dataclass into a config node.
    return instantiate(editor_cfg, _partial_=True)(backbone=backbone, resolution=resolution, compile=compile, **extra)
