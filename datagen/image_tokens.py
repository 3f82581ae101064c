"""E(x) of StyleDiffusion: every token of a CLIP vision tower's last layer after its post layernorm, without the
projection (STYLEDIFFUSION.md section 1.2; the official code's patched `VisionTransformer`): SD's
openai/clip-vit-base-patch16 gives 197 x 768.

Preprocessing as the code's: [0, 1] images, bicubic resize of the shorter side to the tower's input size, centre
crop, the processor's mean and std. A tower narrower or wider than the text embedding (the toy world's is 64 wide,
its text 32) is average-pooled along the width to the text's, so the mapping network's FiLM c * s + b applies.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from datagen.backbone import Backbone
from datagen.runtime import model_unavailable

SD_ENCODER = "openai/clip-vit-base-patch16"
TOY_ENCODER = Path(__file__).resolve().parent.parent / "toyworld" / "weights" / "clip"


class ImageTokens:
    """`__call__(images)`: B x 3 x H x W in [0, 1] -> B x N x `width` tokens, fp32, without gradients."""

    def __init__(self, model: CLIPVisionModel, mean: list[float], std: list[float], width: int, name: str) -> None:
        self.model, self.width, self.name = model.eval().requires_grad_(False), width, name
        self.size = model.config.image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = self.model.device, self.model.dtype
        x = images.float().to(device)
        height, width = x.shape[-2:]
        scale = self.size / min(height, width)
        if (height, width) != (self.size, self.size):
            x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bicubic", align_corners=False)
            top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        x = (x - self.mean.to(device)) / self.std.to(device)
        hidden = self.model(pixel_values=x.to(dtype)).last_hidden_state  # B x N x W
        tokens = self.model.post_layernorm(hidden).float()  # CLIP pools token 0 through it; we take all
        if tokens.shape[-1] != self.width:
            tokens = F.adaptive_avg_pool1d(tokens, self.width)
        return tokens


def random_tower(width: int, size: str = "tiny", seed: int = 0) -> CLIPVisionModel:
    """A random ViT: "tiny" (tests, model=tiny) 32 px, patch 8 (17 tokens), `width` wide; "vit-b/16" the shape of
    openai/clip-vit-base-patch16 (224 px, 197 tokens, 768 wide, 12 layers), for benchmarks on random SD-shaped
    weights."""
    shape = {"tiny": dict(image_size=32, patch_size=8, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=2),
             "vit-b/16": dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12)}[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModel(CLIPVisionConfig(**shape))


# Backbones of random weights (datagen.backbone.tiny_backbone, bench's SD-shaped one) get a random tower
RANDOM_TOWERS = {"tiny": "tiny", "random-sd": "vit-b/16"}


def image_tokens_for(backbone: Backbone, source: str | None = None) -> ImageTokens:
    """The image encoder `source` (a hub id or folder holding a CLIP or CLIP vision model), by default the model's:
    the toy world's own CLIP for model=toy, openai/clip-vit-base-patch16 for SD, a random tower for random weights.
    On the backbone's device and in its precision (the code runs CLIP in fp16 on CUDA)."""
    width = backbone.text_encoder.config.hidden_size
    if source is None and backbone.name in RANDOM_TOWERS:
        model, mean, std = random_tower(width, RANDOM_TOWERS[backbone.name]), [0.5] * 3, [0.5] * 3
        name = f"random-{RANDOM_TOWERS[backbone.name]}"
    else:
        source = source or (str(TOY_ENCODER) if backbone.name == "toy" else SD_ENCODER)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # a CLIPModel folder's text tower is reported as unused keys
        try:
            model = CLIPVisionModel.from_pretrained(source, torch_dtype=torch.float32)
            processor = CLIPImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise model_unavailable("CLIP image encoder", source, error) from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        mean, std, name = list(processor.image_mean), list(processor.image_std), source
    return ImageTokens(model.to(backbone.device, backbone.dtype), mean, std, width, name)
