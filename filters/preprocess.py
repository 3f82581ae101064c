"""A scorer's processor: its tokenizer, and its image side as tensor transforms (batched, on the scorer's device)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch import nn
from torchvision.transforms import v2

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_transform(
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop: int | tuple[int, int] | None = None,
) -> nn.Module:
    """B x 3 x H x W in [0, 1] -> normalised model input.

    With `crop` the shorter side is resized to `size` and the centre `crop` cut out (CLIP's processors);
    without, the image is resized to exactly `size` = (height, width) (CLIPSeg's squashes to 352 x 352).
    """
    mode = v2.InterpolationMode[interpolation.upper()]
    resize = [v2.Resize(size, interpolation=mode, antialias=True)] + ([v2.CenterCrop(crop)] if crop is not None else [])
    return v2.Compose([*resize, v2.Normalize(mean=list(mean), std=list(std))])


def interpolation_name(resample: int | str) -> str:
    """A Hugging Face processor's `resample` (a PIL filter number) as a torchvision mode name."""
    if isinstance(resample, str):
        return resample
    return Image.Resampling(resample).name.lower()


def load_processor(name_or_path: str):
    """(tokenizer, image processor or None) of a hub model or a local folder.

    A folder saved without them (a model trained here, weights and config only) gets the real CLIP
    tokenizer rebuilt offline, which every CLIP-family model in this project uses, and no image processor.
    transformers would otherwise build an empty 2-token tokenizer from the model config alone.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from datagen.tokenizer import clip_tokenizer

    folder = Path(name_or_path)

    def saved(*files: str) -> bool:
        return not folder.is_dir() or any((folder / file).exists() for file in files)

    tokenizer = AutoTokenizer.from_pretrained(name_or_path) if saved("tokenizer.json", "vocab.json") else clip_tokenizer()
    image_processor = AutoImageProcessor.from_pretrained(name_or_path) if saved("preprocessor_config.json", "processor_config.json") else None
    return tokenizer, image_processor
