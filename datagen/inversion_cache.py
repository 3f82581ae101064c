"""Finished inversions on disk, one file per (image, prompt, settings): what editing an image needs, so that one
inversion serves every edit, task and rerun of it, and a killed run redoes only the inversions it had not saved.

The key hashes the image's bytes (fp32, as the editor receives it), the prompt and a settings digest (the
inversion's options, steps, guidance, scheduler, the models' fingerprints, the image encoder). A file is written to
a temporary name and renamed, so a reader never sees half of one and two workers saving the same key both leave
a whole file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from datagen.backbone import Backbone
from datagen.directions import encoder_fingerprint

log = logging.getLogger(__name__)


def model_fingerprint(backbone: Backbone) -> str:
    """Identifies the text encoder, UNet and VAE cheaply: their configs and first and last tensors."""
    digest = hashlib.sha256(encoder_fingerprint(backbone).encode())
    for module in (backbone.unet, backbone.vae):
        digest.update(str(module.config).encode())
        params = list(module.parameters())
        for tensor in params[:1] + params[-1:]:
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class InversionCache:
    """Entries (dicts of tensors and a json-able `record`) under `folder`; `folder` None keeps nothing."""

    def __init__(self, folder: Path | None, settings: dict[str, Any]) -> None:
        self.folder = folder
        self.settings = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

    def key(self, image: torch.Tensor, prompt: str) -> str:
        """image: 3 x H x W in [0, 1]."""
        digest = hashlib.sha256(self.settings.encode())
        digest.update(prompt.encode())
        digest.update(str(tuple(image.shape)).encode())
        digest.update(image.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        log.debug("inversion cache hit: %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, key: str, entry: dict[str, Any]) -> None:
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(entry, tmp)
        tmp.replace(path)
