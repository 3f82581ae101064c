"""Where inputs come from. A source maps a global sample index to one input, the same whatever worker,
shard or batch asks, which is what makes sharded and resumed runs equal to one unbroken run.

Real images (a folder, or webdataset shards such as img2dataset's output) are fitted to the model
resolution by one rule, `fit`: `center_crop` (default) scales the short side to the resolution and
crops the centre; `resize` squashes to a square; `pad` scales the long side and pads with black.
"""
from __future__ import annotations

import io
import logging
import random
import tarfile
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from webdataset.shardlists import expand_urls

from datagen.directions import load_sentences

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FIT_MODES = ("center_crop", "resize", "pad")
log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source that cannot be read at all (no such folder, no images): a config error, not a bad input."""


class InputRejected(Exception):
    """An input that cannot become a pair. `reason` is a short category counted in the summary
    (empty file, unreadable, too small, too large, non-finite latents); `detail` names the input and the cause."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Sample:
    index: int
    seed: int
    prompt: str | None  # source prompt (synthetic) or caption (real); None: caption it
    image: torch.Tensor | None = None  # 3 x R x R in [0, 1] for real inputs
    meta: dict = field(default_factory=dict)


class SyntheticSource:
    """Source prompts drawn from the source word's bank; x_T from the sample's seed (no inversion).
    Unbounded (no `len`): num_pairs decides the job's size."""

    def __init__(self, bank: str, seed: int = 0) -> None:
        self.sentences, self.seed = load_sentences(bank), seed

    def __getitem__(self, index: int) -> Sample:
        seed = self.seed + index
        return Sample(index, seed, random.Random(seed).choice(self.sentences), meta={"source": "synthetic"})


def fit_image(image: Image.Image, resolution: int, mode: str = "center_crop") -> torch.Tensor:
    """Any PIL image (RGB, greyscale, palette, RGBA, CMYK, 16-bit) -> 3 x R x R float in [0, 1].
    Transparency is composited on white, the background most product and clip-art images assume."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits before RGB conversion
        image = image.point(lambda v: v / 257).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    x = TF.to_dtype(TF.to_image(image.convert("RGB")), torch.float32, scale=True)
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
        raise ValueError(f"unknown fit mode {mode!r} ({', '.join(FIT_MODES)})")
    return x.clamp(0, 1)


def decode_image(data: bytes, resolution: int, fit: str, min_side: int, max_pixels: int) -> torch.Tensor:
    """Encoded image bytes -> fitted tensor, or InputRejected with the reason."""
    if not data:
        raise InputRejected("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # our own max_pixels decides
            with Image.open(io.BytesIO(data)) as image:
                if min(image.size) < min_side:
                    raise InputRejected("too small", f"{image.width}x{image.height}, shortest side < {min_side}")
                if image.width * image.height > max_pixels:
                    raise InputRejected("too large", f"{image.width}x{image.height} > {max_pixels} pixels")
                image.load()  # the header was fine; a truncated or corrupt body fails here
                return fit_image(ImageOps.exif_transpose(image), resolution, fit)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputRejected("too large", str(error)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise InputRejected("unreadable", f"{type(error).__name__}: {error}") from None


class ImageSource(ABC):
    """Real images with optional captions, in a fixed order. Subclasses list the inputs and read their bytes."""

    def __init__(self, resolution: int, fit: str = "center_crop", min_side: int = 32, max_pixels: int = 64_000_000,
                 seed: int = 0, caption: str | None = None) -> None:
        if fit not in FIT_MODES:
            raise SourceError(f"source.fit must be one of {', '.join(FIT_MODES)}, not {fit!r}")
        self.resolution, self.fit, self.min_side, self.max_pixels, self.seed = resolution, fit, min_side, max_pixels, seed
        self.caption = caption

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, index: int) -> tuple[str, bytes, str | None]:
        """The input's name (recorded as `source`), its encoded bytes and its caption (None: caption it)."""

    def __getitem__(self, index: int) -> Sample:
        name, data, caption = self.read(index)
        try:
            image = decode_image(data, self.resolution, self.fit, self.min_side, self.max_pixels)
        except InputRejected as error:
            raise InputRejected(error.reason, f"{name}: {error.detail}" if error.detail else name) from None
        return Sample(index, self.seed + index, self.caption or caption, image, {"source": name})


class FolderSource(ImageSource):
    """Images under `path` (recursive, sorted by relative path); a sidecar `name.txt` is the caption."""

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise SourceError(f"source.path is not a folder: {self.root}")
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[str, bytes, str | None]:
        path = self.files[index]
        sidecar = path.with_suffix(".txt")
        caption = (sidecar.read_text(encoding="utf-8").strip() or None) if sidecar.is_file() else None
        return str(path.relative_to(self.root)), path.read_bytes(), caption


@dataclass(frozen=True)
class TarEntry:
    """Where one sample's image (and caption) bytes lie inside an uncompressed tar."""

    tar: Path
    key: str
    image: tuple[int, int]  # offset, size
    caption: tuple[int, int] | None


class ShardsSource(ImageSource):
    """Samples of existing webdataset shards (img2dataset's output: `key.jpg` + `key.txt`), in shard then
    member order. `urls` is a local folder (its *.tar, sorted), or shard paths with brace expansion and
    `::` separators (`data/{00000..00099}.tar`). Shards must be uncompressed tars: samples are read by offset."""

    def __init__(self, urls: str, **kwargs) -> None:
        super().__init__(**kwargs)
        root = Path(urls).expanduser()
        paths = sorted(root.glob("*.tar")) if root.is_dir() else [Path(url).expanduser() for url in expand_urls(urls)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"{len(missing)} shard(s) not found, the first: {missing[0]}")
        self.entries = [entry for path in paths for entry in self.scan(path)]
        if not self.entries:
            raise SourceError(f"no samples with an image ({', '.join(IMAGE_SUFFIXES)}) in the shards {urls}")

    @staticmethod
    def scan(path: Path) -> list[TarEntry]:
        """Index a tar by its headers alone (webdataset's rule: the key is the name up to the first dot)."""
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if member.isfile():
                        key, _, ext = member.name.partition(".")
                        members.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
        except tarfile.ReadError as error:  # a damaged tail: keep the samples indexed before it
            if not members:
                raise SourceError(f"{path} is not an uncompressed tar ({error})") from None
            log.warning("%s: %s; using the %d samples before the damage", path, error, len(members))
        entries = []
        for key, files in members.items():
            image = next((files[ext] for ext in (s.lstrip(".") for s in IMAGE_SUFFIXES) if ext in files), None)
            if image is not None:
                entries.append(TarEntry(path, key, image, files.get("txt")))
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, index: int) -> tuple[str, bytes, str | None]:
        entry = self.entries[index]
        with open(entry.tar, "rb") as f:
            f.seek(entry.image[0])
            data = f.read(entry.image[1])
            caption = None
            if entry.caption is not None:
                f.seek(entry.caption[0])
                caption = f.read(entry.caption[1]).decode("utf-8", errors="replace").strip() or None
        return f"{entry.tar.name}/{entry.key}", data, caption
