"""Edit directions: mean text embedding of the target bank minus that of the source bank (77 x D).

A bank is a sentence file (a name in datagen/sentences/ or a path to a .txt file) or a precomputed
mean embedding (.pt, as the official repository ships: `cat.pt`, `dog.pt`). Directions are tied to the
text encoder that made them, so the on-disk cache is keyed by the encoder's fingerprint and the banks'
contents.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from datagen.backbone import Backbone

SENTENCES = Path(__file__).parent / "sentences"
log = logging.getLogger(__name__)


class BankError(ValueError):
    pass


def bank_path(bank: str) -> Path:
    path = Path(bank).expanduser()
    if path.suffix in (".txt", ".pt"):
        if not path.is_file():
            raise BankError(f"sentence bank file not found: {path}")
        return path
    path = SENTENCES / f"{bank}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SENTENCES.glob("*.txt")))
        raise BankError(f"no bundled sentence bank '{bank}' (bundled: {known}); name a .txt or .pt file instead")
    return path


def load_sentences(bank: str) -> list[str]:
    lines = [line.strip() for line in bank_path(bank).read_text(encoding="utf-8").splitlines()]
    sentences = [line for line in lines if line]
    if not sentences:
        raise BankError(f"sentence bank '{bank}' is empty")
    return sentences


def encoder_fingerprint(backbone: Backbone) -> str:
    """Identifies the text encoder's weights cheaply: its config and two small tensors."""
    te = backbone.text_encoder
    digest = hashlib.sha256(te.config.to_json_string().encode())
    for name, tensor in te.named_parameters():
        if name.endswith(("position_embedding.weight", "final_layer_norm.weight")):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def mean_embedding(backbone: Backbone, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """1 x 77 x D, accumulated in fp32."""
    total = None
    for i in range(0, len(sentences), batch_size):
        chunk = backbone.encode_text(sentences[i : i + batch_size]).float().sum(0, keepdim=True)
        total = chunk if total is None else total + chunk
    return (total / len(sentences)).cpu()


def bank_embedding(backbone: Backbone, bank: str, cache_dir: Path | None) -> torch.Tensor:
    path = bank_path(bank)
    if path.suffix == ".pt":
        embedding = torch.load(path, map_location="cpu", weights_only=True).float()
        return embedding.reshape(1, *embedding.shape[-2:])
    key = hashlib.sha256(encoder_fingerprint(backbone).encode() + path.read_bytes()).hexdigest()[:24]
    cached = cache_dir / f"{path.stem}-{key}.pt" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        log.info("edit direction cache hit: %s", cached)
        return torch.load(cached, map_location="cpu", weights_only=True)
    embedding = mean_embedding(backbone, load_sentences(bank))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        torch.save(embedding, tmp)
        tmp.replace(cached)
    return embedding


def edit_direction(backbone: Backbone, task, cache_dir: str | Path | None = None) -> torch.Tensor:
    """The task's direction, 1 x 77 x D: `task.direction` (.pt) if set, else target bank - source bank."""
    if task.get("direction"):
        direction = torch.load(Path(task.direction).expanduser(), map_location="cpu", weights_only=True).float()
        return direction.reshape(1, *direction.shape[-2:])
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    return bank_embedding(backbone, task.target_bank, cache) - bank_embedding(backbone, task.source_bank, cache)
