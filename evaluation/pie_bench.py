"""PIE-Bench (Ju et al., "Direct Inversion", ICLR 2024) as a benchmark source, and its metrics with its conventions.

The data: `data/mapping_file.json` (700 entries, each keyed by a 12-digit id) and `data/annotation_images/`. An entry
holds `image_path` (relative to annotation_images/), `original_prompt` and `editing_prompt` (the words that differ
in [brackets], stripped here as the official runners do), `editing_instruction`, `editing_type_id` ("0" to "9"),
`blended_word` ("source target", or "") and `mask`, the edited region run-length encoded on 512 x 512.

The metrics follow the official evaluation (PnPInversion evaluation/evaluate.py and matrics_calculator.py):

- images are compared as the 8-bit pictures PIE-Bench reads from files, in [0, 1];
- a region metric multiplies *both* images by the region's mask and computes on the full image; an empty region
  gives nan. Background = 1 - mask, edited = mask;
- PSNR, MSE and SSIM with data_range 1 (torchmetrics; SSIM's default 11 px Gaussian window, sigma 1.5);
- LPIPS with the SqueezeNet trunk (torchmetrics' `net_type='squeeze'`) on the images scaled to [-1, 1];
- CLIP score = max(100 cos(image, text), 0) (torchmetrics' CLIPScore, ViT-L/14), the masked one on image x mask;
- structure distance: the MSE between the last-layer key self-similarities of a DINO ViT-B/8 of the two whole
  images, fed the 0-255 pixel values (not rescaled: the official code's input) resized to 224, ImageNet-normalised.

Reported scales (as the paper's tables): structure x 10^3, LPIPS x 10^3, MSE x 10^4, SSIM x 10^2.
"""
from __future__ import annotations

import json
import urllib.error
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lpips
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from evaluation.ground_truth import BenchmarkSet
from evaluation.metrics import KeySelfSimilarity, structure_distance
from filters.clip_gain import ClipEncoder
from filters.loading import MissingModelError
from filters.score import load_model

MAPPING_FILE = "mapping_file.json"
IMAGES = "annotation_images"
SIDE = 512  # the masks' frame
EDITING_TYPES = ("random", "change object", "add object", "delete object", "change content", "change pose",
                 "change colour", "change material", "change background", "change style")
SCALES = {"structure": 1e3, "bg_lpips": 1e3, "bg_mse": 1e4, "bg_ssim": 1e2}  # the paper's reported units


def mask_decode(encoded: Sequence[int], shape: tuple[int, int] = (SIDE, SIDE)) -> np.ndarray:
    """PIE-Bench's RLE -> H x W bool: (start, length) pairs over the row-major flattened image set to 1, a run cut at
    the image's end, and the border rows and columns forced to 1 (the official decoder's guard against annotation
    errors at the border)."""
    length = shape[0] * shape[1]
    flat = np.zeros(length, dtype=bool)
    for start, run in zip(encoded[0::2], encoded[1::2]):
        flat[start : start + min(run, length - start)] = True
    mask = flat.reshape(shape)
    force_border(mask)
    return mask


def mask_encode(mask: np.ndarray) -> list[int]:
    """H x W bool -> PIE-Bench's RLE: a (start, length) pair per run of ones in the row-major flattened mask."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # run starts and ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    return [int(value) for pair in zip(starts, ends - starts) for value in pair]


def force_border(mask: np.ndarray | Tensor) -> None:
    """Set the border rows and columns of `mask` (..., H, W) to 1, in place."""
    mask[..., 0, :] = 1
    mask[..., -1, :] = 1
    mask[..., :, 0] = 1
    mask[..., :, -1] = 1


def strip_brackets(prompt: str) -> str:
    return prompt.replace("[", "").replace("]", "")


@dataclass(frozen=True)
class PieBenchEntry:
    key: str
    image_path: str
    source_prompt: str
    target_prompt: str
    instruction: str
    editing_type: int
    blended_words: tuple[str, str] | None
    mask: np.ndarray  # 512 x 512 bool, the edited region (border included)


class PieBenchError(ValueError):
    """The folder is not PIE-Bench's data/ folder, or an entry cannot be read."""


def read_mapping(root: str | Path, editing_types: Sequence[int] | None = None, limit: int | None = None) -> list[PieBenchEntry]:
    """The entries of `root`/mapping_file.json, in key order; only `editing_types` (ids) if given, the first `limit`."""
    root = Path(root).expanduser()
    path = root / MAPPING_FILE
    if not path.is_file():
        raise PieBenchError(f"{path} not found: source.path must be PIE-Bench's data/ folder "
                            f"({MAPPING_FILE} and {IMAGES}/)")
    mapping = json.loads(path.read_text(encoding="utf-8"))
    wanted = None if editing_types is None else {int(t) for t in editing_types}
    entries = []
    for key in sorted(mapping):
        item = mapping[key]
        kind = int(item["editing_type_id"])
        if wanted is not None and kind not in wanted:
            continue
        words = item.get("blended_word", "").split()
        entries.append(PieBenchEntry(
            key=key, image_path=item["image_path"], source_prompt=strip_brackets(item["original_prompt"]),
            target_prompt=strip_brackets(item["editing_prompt"]), instruction=item.get("editing_instruction", ""),
            editing_type=kind, blended_words=(words[0], words[1]) if len(words) == 2 else None,
            mask=mask_decode(item["mask"])))
    return entries[:limit]


def load_image(path: Path, size: int) -> Tensor:
    """3 x size x size in [0, 1]; PIE-Bench's images are 512 x 512, resized only for a model of another resolution
    (shrunk by box filter: each pixel the mean of those it covers; enlarged bicubic)."""
    try:
        picture = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    except OSError as error:
        raise PieBenchError(f"cannot read {path}: {error}") from None
    image = torch.from_numpy(picture).permute(2, 0, 1)
    if image.shape[-1] > size:
        image = F.interpolate(image[None], size=(size, size), mode="area")[0]
    elif image.shape[-2:] != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return image


def resize_mask(mask: np.ndarray, size: int) -> Tensor:
    """size x size bool: nearest-neighbour, then the border forced again, as decoded at the working resolution."""
    region = torch.from_numpy(mask)
    if region.shape != (size, size):
        region = F.interpolate(region[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0.5
        force_border(region)
    return region


def pie_bench_set(path: str | Path, size: int, editing_types: Sequence[int] | None = None, n: int | None = None,
                  seed: int = 1234) -> BenchmarkSet:
    """PIE-Bench's images with their prompts and masks: the first `n` entries (None: all) of `editing_types` (None:
    all). Every pair's seed is `seed` (the official runners set 1234 before each image); the word-only direction
    uses the blended words where the entry has them."""
    entries = read_mapping(path, editing_types, n)
    if not entries:
        raise PieBenchError(f"no entry of {Path(path) / MAPPING_FILE} has editing type in {list(editing_types or [])}")
    images_dir = Path(path).expanduser() / IMAGES
    return BenchmarkSet(
        name="pie_bench", keys=[e.key for e in entries],
        images=torch.stack([load_image(images_dir / e.image_path, size) for e in entries]),
        prompts=[e.source_prompt for e in entries], target_prompts=[e.target_prompt for e in entries],
        seeds=[seed] * len(entries), edit_masks=torch.stack([resize_mask(e.mask, size) for e in entries]),
        words=[e.blended_words for e in entries],
        meta=[{"image_path": e.image_path, "editing_type": e.editing_type, "instruction": e.instruction} for e in entries])


def pie_bench_sets(path: str | Path, size: int, editing_types: Sequence[int] | None = None, n: int | None = None,
                   seed: int = 1234) -> list[BenchmarkSet]:
    """`benchmark/source=pie_bench`: the whole selection as one set."""
    return [pie_bench_set(path, size, editing_types, n, seed)]


class PixelScale(nn.Module):
    """Multiplies the pixels: PIE-Bench feeds DINO 0-255 values where a ViT's processor expects 0-1."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, images: Tensor) -> Tensor:
        return images * self.factor


def scaled_inputs(vit: KeySelfSimilarity, pixel_scale: float) -> KeySelfSimilarity:
    """`vit` fed `pixel_scale` x the [0, 1] image, then its own resize and normalisation: the official order (0-255
    pixels resized, then normalised), since a resize is linear in the pixels."""
    vit.preprocess = nn.Sequential(PixelScale(pixel_scale), vit.preprocess)
    return vit


def dino_self_similarity(name_or_path: str = "facebook/dino-vitb8", image_size: int = 224, pixel_scale: float = 255.0) -> KeySelfSimilarity:
    """PIE-Bench's structure ViT: DINO ViT-B/8's last-layer keys of the 0-255 image resized to `image_size`."""
    return scaled_inputs(KeySelfSimilarity.from_pretrained(name_or_path, image_size), pixel_scale)


def squeeze_lpips(pretrained_trunk: bool = True) -> nn.Module:
    """LPIPS with the SqueezeNet trunk and the linear heads shipped in the package (torchmetrics' net_type='squeeze'
    computes the same). The trunk is torchvision's ImageNet SqueezeNet 1.1, or random with `pretrained_trunk=False`
    (offline presets: drawn from seed 0, the same in every run)."""
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", UserWarning)  # lpips calls torchvision's deprecated `pretrained=`
            torch.manual_seed(0)
            net = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=not pretrained_trunk, verbose=False)
    except (urllib.error.URLError, OSError) as error:
        raise MissingModelError(
            f"PIE-Bench's LPIPS needs torchvision's ImageNet SqueezeNet 1.1 weights (squeezenet1_1-b8a52dc0.pth) and could "
            f"not download them ({error}). Put the file into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch), or "
            "benchmark offline with model=toy or model=tiny") from None
    return net.eval().requires_grad_(False)


def eight_bit(images: Tensor) -> Tensor:
    """Images in [0, 1] on the 256 levels a PNG or JPEG holds."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def masked(images: Tensor, region: Tensor) -> Tensor:
    """B x 3 x H x W times the region (B x H x W bool), every channel."""
    return images * region[:, None].to(images.dtype)


def with_region(values: Tensor, region: Tensor) -> Tensor:
    """nan where the region is empty, as the official evaluation writes."""
    return torch.where(region.flatten(1).any(1), values, torch.nan)


def psnr(images: Tensor, references: Tensor) -> Tensor:
    return peak_signal_noise_ratio(images, references, data_range=1.0, reduction="none", dim=(1, 2, 3))


def mse(images: Tensor, references: Tensor) -> Tensor:
    return (images - references).square().flatten(1).mean(1)


def ssim(images: Tensor, references: Tensor) -> Tensor:
    return structural_similarity_index_measure(images, references, data_range=1.0, reduction="none")


def clip_score(encoder: ClipEncoder, images: Tensor, texts: Sequence[str]) -> Tensor:
    """max(100 cos(image, text), 0) per pair, images in [0, 1]."""
    cosine = (encoder.encode_images(images) * encoder.encode_texts(list(texts))).sum(-1)
    return (100 * cosine).clamp_min(0).cpu()


class PieBenchMetrics:
    """PIE-Bench's eight default metrics of B edits against their sources, per pair."""

    def __init__(self, clip: ClipEncoder, self_similarity: KeySelfSimilarity, lpips_net: nn.Module):
        self.clip, self.self_similarity, self.lpips = clip, self_similarity, lpips_net

    @classmethod
    def build(cls, cfg: Mapping[str, Any], device: torch.device,
              load: Callable[[Mapping[str, Any]], nn.Module] = load_model) -> PieBenchMetrics:
        """The preset's models (conf/benchmark/pie_metrics/*.yaml): `clip` and `structure` (`_target_` each, made by
        `load`), and `lpips_pretrained_trunk`."""
        return cls(load(cfg["clip"]).to(device).eval(), load(cfg["structure"]).to(device).eval(),
                   squeeze_lpips(cfg["lpips_pretrained_trunk"]).to(device))

    @property
    def device(self) -> torch.device:
        return self.self_similarity.device

    @torch.no_grad()
    def __call__(self, sources: Tensor, edited: Tensor, masks: Tensor, source_prompts: Sequence[str],
                 target_prompts: Sequence[str]) -> dict[str, Tensor]:
        """Images B x 3 x H x W in [0, 1], `masks` B x H x W bool (the edited region)."""
        sources, edited = eight_bit(sources).to(self.device), eight_bit(edited).to(self.device)
        masks = masks.to(self.device)
        background = ~masks
        source_bg, edited_bg = masked(sources, background), masked(edited, background)
        lpips_bg = self.lpips(source_bg * 2 - 1, edited_bg * 2 - 1).flatten()
        values = {
            "structure": structure_distance(self.self_similarity, edited * 2 - 1, sources * 2 - 1),
            "bg_psnr": with_region(psnr(source_bg, edited_bg), background),
            "bg_lpips": with_region(lpips_bg, background),
            "bg_mse": with_region(mse(source_bg, edited_bg), background),
            "bg_ssim": with_region(ssim(source_bg, edited_bg), background),
            "clip_source": clip_score(self.clip, sources, source_prompts),
            "clip_whole": clip_score(self.clip, edited, target_prompts),
            "clip_edited": with_region(clip_score(self.clip, masked(edited, masks), target_prompts).to(self.device), masks),
        }
        return {name: value.float().cpu() for name, value in values.items()}
