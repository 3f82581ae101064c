"""Where inputs come from. A source maps a global sample index to one input, the same whatever worker,
shard or batch asks, which is what makes sharded and resumed runs equal to one unbroken run."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from datagen.directions import load_sentences

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class InputRejected(Exception):
    """An input that cannot become a pair; the message is the reason logged in rejects.jsonl."""


@dataclass
class Sample:
    index: int
    seed: int
    prompt: str | None  # source prompt (synthetic) or caption (real); None: caption it
    image: torch.Tensor | None = None  # 3 x R x R in [0, 1] for real inputs
    meta: dict = field(default_factory=dict)


class SyntheticSource:
    """Source prompts drawn from the source word's bank; x_T from the sample's seed (no inversion)."""

    def __init__(self, bank: str, seed: int = 0) -> None:
        self.sentences, self.seed = load_sentences(bank), seed

    def __len__(self) -> int | None:  # unbounded: num_pairs decides
        return None

    def __getitem__(self, index: int) -> Sample:
        seed = self.seed + index
        return Sample(index, seed, random.Random(seed).choice(self.sentences), meta={"source": "synthetic"})


def fit_image(image: Image.Image, resolution: int, mode: str = "center_crop") -> torch.Tensor:
    """Any PIL image -> 3 x R x R float in [0, 1]. `center_crop`: scale the short side to R, crop the centre;
    `resize`: squash to R x R; `pad`: scale the long side to R, pad with black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits before RGB conversion
        image = image.point(lambda v: v / 257).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    x = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
    if mode == "center_crop":
        x = TF.center_crop(TF.resize(x, resolution, antialias=True), [resolution, resolution])
    elif mode == "resize":
        x = TF.resize(x, [resolution, resolution], antialias=True)
    elif mode == "pad":
        h, w = x.shape[-2:]
        scale = resolution / max(h, w)
        x = TF.resize(x, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
        h, w = x.shape[-2:]
        x = TF.pad(x, [(resolution - w) // 2, (resolution - h) // 2, (resolution - w + 1) // 2, (resolution - h + 1) // 2])
    else:
        raise ValueError(f"unknown fit mode {mode!r} (center_crop, resize, pad)")
    return x.clamp(0, 1)


def load_image(path: Path, resolution: int, fit: str, min_side: int = 16, max_pixels: int = 100_000_000) -> torch.Tensor:
    if path.stat().st_size == 0:
        raise InputRejected("empty file")
    try:
        with Image.open(path) as image:
            if image.width < min_side or image.height < min_side:
                raise InputRejected(f"too small ({image.width}x{image.height} < {min_side})")
            if image.width * image.height > max_pixels:
                raise InputRejected(f"too large ({image.width}x{image.height} > {max_pixels} pixels)")
            image = ImageOps.exif_transpose(image)
            image.load()
            return fit_image(image, resolution, fit)
    except InputRejected:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputRejected(f"unreadable image: {type(error).__name__}: {error}") from None


class FolderSource:
    """Images under `path` (recursive, sorted by relative path); a sidecar `name.txt` is the caption."""

    def __init__(self, path: str, resolution: int, fit: str = "center_crop", seed: int = 0) -> None:
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"source.path is not a folder: {self.root}")
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self.resolution, self.fit, self.seed = resolution, fit, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        path = self.files[index]
        meta = {"source": str(path.relative_to(self.root))}
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() or None if sidecar.is_file() else None
        try:
            image = load_image(path, self.resolution, self.fit)
        except InputRejected as error:
            raise InputRejected(f"{meta['source']}: {error}") from None
        return Sample(index, self.seed + index, caption, image, meta)
