"""The paper's edit metrics (pix2pix-zero, section 4) and the student's fidelity to its teacher, per pair.

Images are B x 3 x H x W in [-1, 1] unless a docstring says otherwise; every function returns one value
per pair (a tensor of B), so a report can average them and a grid can sort them.

- CLIP Acc: an edit is correct when CLIP puts it closer to the target text than to the source text.
  `clip_margin` = cos(edit, target) - cos(edit, source); CLIP Acc is the share of margins > 0.
- Structure Dist (Tumanyan et al. 2022, "Splicing ViT Features"): the self-similarity of a ViT's last-layer
  keys (all heads concatenated, CLS token included, cosine between every pair of tokens) is a T x T picture
  of the image's layout that ignores its appearance; the distance is the MSE between the two matrices.
- BG LPIPS: LPIPS between input and edit with the object region (masks given) blanked in both.
- Student vs teacher: LPIPS, L1 and PSNR (`distill.losses.psnr`, as in the distillation's validation).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from filters.clip_gain import ClipEncoder
from filters.loading import MissingModelError, ModelWrapper
from filters.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_processor, pixel_transform

DINO = "facebook/dino-vitb8"


class ClipMargin:
    """`ClipMargin(images)`: cos(image, target text) - cos(image, source text) for images in [-1, 1]."""

    def __init__(self, encoder: ClipEncoder, source_text: str, target_text: str):
        self.encoder = encoder
        self.texts = encoder.encode_texts([source_text, target_text])  # 2 x D, unit length

    def __call__(self, images: Tensor) -> Tensor:
        similarity = self.encoder.encode_images((images + 1) / 2) @ self.texts.T  # B x 2
        return (similarity[:, 1] - similarity[:, 0]).cpu()


class KeySelfSimilarity(ModelWrapper):
    """A ViT's last-layer key self-similarity: images B x 3 x H x W in [-1, 1] -> B x T x T cosines.

    Works with any transformers vision transformer whose attention layers project keys with a `k_proj`
    module (ViTModel for DINO, CLIPVisionModel): a hook reads the last one's output, B x T x (heads * dim),
    which is exactly the per-token concatenation of all heads' keys.
    """

    def __init__(self, model: nn.Module, preprocess: nn.Module):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        projections = [module for name, module in model.named_modules() if name.endswith("k_proj")]
        if not projections:
            raise ValueError(f"{type(model).__name__} has no attention key projection (k_proj) to read")
        self.key_projection = projections[-1]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        captured: list[Tensor] = []
        handle = self.key_projection.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            self.model(pixel_values=self.preprocess((images.to(self.device, self.dtype) + 1) / 2))
        finally:
            handle.remove()
        keys = F.normalize(captured[0].float(), dim=-1)  # B x T x C
        return keys @ keys.transpose(1, 2)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DINO, image_size: int = 224) -> KeySelfSimilarity:
        """A DINO ViT (transformers ViTModel) on images resized to `image_size` with ImageNet statistics, as Splice does."""
        from transformers import ViTModel

        try:
            model = ViTModel.from_pretrained(name_or_path, add_pooling_layer=False)
        except OSError as error:
            raise missing_vit(name_or_path, error) from None
        return cls(model, pixel_transform((image_size, image_size), IMAGENET_MEAN, IMAGENET_STD, "bilinear"))

    @classmethod
    def from_clip(cls, name_or_path: str) -> KeySelfSimilarity:
        """The vision tower of a transformers CLIPModel (the toy world has no DINO: its CLIP is its trained ViT)."""
        from transformers import CLIPVisionModel

        try:
            model = CLIPVisionModel.from_pretrained(name_or_path)
            _, image_processor = load_processor(name_or_path)
        except OSError as error:
            raise missing_vit(name_or_path, error) from None
        side = model.config.image_size
        mean, std = (image_processor.image_mean, image_processor.image_std) if image_processor else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        return cls(model, pixel_transform((side, side), mean, std, "bicubic"))

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32) -> KeySelfSimilarity:
        """A 2-layer, 32-wide random ViT with 4 px patches: offline tests and smoke runs."""
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(image_size=image_size, patch_size=4, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ViTModel(config, add_pooling_layer=False).eval()
        return cls(model, pixel_transform((image_size, image_size), IMAGENET_MEAN, IMAGENET_STD, "bilinear"))


def missing_vit(name_or_path: str, error: OSError) -> MissingModelError:
    """The scorers' one-line error, with the advice that fits a metric preset's model."""
    missing_path = name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists()
    cause = "no such file or folder" if missing_path else next(iter(str(error).strip().splitlines()), type(error).__name__)
    return MissingModelError(
        f"Structure Dist's ViT {name_or_path!r} is not available ({cause}). Download it once on a machine that can "
        "reach the model hub (it is then cached), point the metric preset at a local copy "
        "(e.g. metrics.sd14.structure.name_or_path=/models/dino-vitb8), or evaluate offline runs of model=tiny or model=toy.")


def structure_distance(self_similarity: KeySelfSimilarity, images: Tensor, references: Tensor) -> Tensor:
    """Per-pair MSE between the key self-similarities of `images` and `references`."""
    both = self_similarity(torch.cat([images, references]))
    ours, theirs = both.chunk(2)
    return (ours - theirs).square().flatten(1).mean(1).cpu()


def background_lpips(lpips: nn.Module, images: Tensor, references: Tensor, object_masks: Tensor) -> Tensor:
    """LPIPS with the object (`object_masks`, B x H x W bool) set to mid-grey in both images.

    Blanking the inputs, rather than averaging a spatial LPIPS map over background pixels, keeps a change
    inside the object out of the score entirely: VGG's receptive fields would smear it into the map's
    background around the object.
    """
    background = (~object_masks).unsqueeze(1).to(images.dtype)
    return lpips(images * background, references * background).flatten().cpu()


def l1_distance(images: Tensor, references: Tensor) -> Tensor:
    return (images.float() - references.float()).abs().flatten(1).mean(1).cpu()
