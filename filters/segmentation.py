"""Segmentation overlap: the object should keep its place and outline through the edit.

A text-prompted segmenter masks the source word in the input and the target word in the edited image;
`seg_iou` is the intersection over union of the two masks, computed at the image's own resolution.
It is NaN when both masks are empty (the overlap of nothing is undefined, and such a pair must never
pass an object-task filter). One empty mask gives 0. `seg_area_input` and `seg_area_edited` keep each
mask's area as a fraction of the image.

The default segmenter is CLIPSeg (`CIDAS/clipseg-rd64-refined`, through transformers): open-vocabulary,
so any task's words work without a fixed class list (COCO has cats, dogs, horses and zebras but no
"cat wearing glasses"), it is small (150 M parameters, one forward per image at 352 x 352), and the
same class loads the hub model, a local folder (the toy world's) or a tiny random config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from filters.loading import ModelWrapper, explain_missing
from filters.preprocess import IMAGENET_MEAN, IMAGENET_STD, interpolation_name, load_processor, pixel_transform

CLIPSEG = "CIDAS/clipseg-rd64-refined"


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boolean masks B x H x W -> B; NaN where both masks are empty."""
    intersection = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.nan)


class ClipSegSegmenter(ModelWrapper):
    """CLIPSeg: images B x 3 x H x W in [0, 1] and one prompt per image in, B x H x W masks out."""

    def __init__(self, model: nn.Module, tokenizer, preprocess: nn.Module, mask_threshold: float = 0.5):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.mask_threshold = mask_threshold

    @torch.no_grad()
    def probabilities(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Per-pixel probability B x H x W that the pixel shows its image's prompt."""
        pixels = self.preprocess(images.to(self.device, self.dtype))
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        logits = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).logits
        logits = F.interpolate(logits.float().unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.squeeze(1).sigmoid()

    def masks(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.probabilities(images, prompts) > self.mask_threshold

    @classmethod
    def from_pretrained(cls, name_or_path: str = CLIPSEG, mask_threshold: float = 0.5) -> ClipSegSegmenter:
        from transformers import CLIPSegForImageSegmentation

        with explain_missing(name_or_path):
            model = CLIPSegForImageSegmentation.from_pretrained(name_or_path)
            tokenizer, image_processor = load_processor(name_or_path)
        if image_processor is None:
            side = model.config.vision_config.image_size
            preprocess = pixel_transform((side, side), IMAGENET_MEAN, IMAGENET_STD, "bilinear")
        else:
            size = (image_processor.size["height"], image_processor.size["width"])
            preprocess = pixel_transform(size, image_processor.image_mean, image_processor.image_std, interpolation_name(image_processor.resample))
        return cls(model, tokenizer, preprocess, mask_threshold)

    @classmethod
    def tiny(cls, seed: int = 0, mask_threshold: float = 0.5) -> ClipSegSegmenter:
        """A 2-layer, 32-wide random CLIPSeg on 32 x 32 inputs with the real tokenizer: offline tests and smoke runs."""
        from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

        from datagen.tokenizer import clip_tokenizer

        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        config = CLIPSegConfig(
            text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
            vision_config=dict(image_size=32, patch_size=4, **tower),
            projection_dim=32,
            extract_layers=[0, 1],
            reduce_dim=16,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
            conditional_layer=0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPSegForImageSegmentation(config).eval()
        preprocess = pixel_transform((32, 32), IMAGENET_MEAN, IMAGENET_STD, "bilinear")
        return cls(model, clip_tokenizer(), preprocess, mask_threshold)


class SegmentationScorer:
    """`seg_iou` of the source word's mask in the input and the target word's mask in the edited image."""

    def __init__(self, segmenter: ClipSegSegmenter, source_word: str, target_word: str):
        self.segmenter = segmenter
        self.source_word, self.target_word = source_word, target_word
        self.undefined_reasons = {"seg_iou": f"both masks empty: no '{source_word}' in the input, no '{target_word}' in the edited image"}

    def __call__(self, inputs: Tensor, edited: Tensor) -> dict[str, Tensor]:
        batch = len(inputs)
        masks = self.segmenter.masks(torch.cat([inputs, edited]), [self.source_word] * batch + [self.target_word] * batch)
        input_masks, edited_masks = masks.chunk(2)
        return {
            "seg_iou": mask_iou(input_masks, edited_masks),
            "seg_area_input": input_masks.flatten(1).float().mean(1),
            "seg_area_edited": edited_masks.flatten(1).float().mean(1),
        }
