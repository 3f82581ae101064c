"""StyleDiffusion's NS-LPIPS (Li et al. 2023, Table 2): LPIPS on the non-selected region, the part of the image an
edit of one word should leave alone, found without a segmenter from the diffusion model's own attention.

The official procedure (sen-mao/StyleDiffusion eval_metrics/storemask.py and ns_lpips.py), step by step:

1. DDIM-invert the input (50 steps, no guidance) with its source prompt, recording the cross-attention of the
   UNet's down and up layers at 16 x 16 queries (SD at 512 px: the coarsest resolution with cross-attention,
   which is what this module takes for any UNet);
2. average the blend word's map over steps, layers and heads. The official store treats every UNet batch as
   [unconditional, conditional] and keeps its second half, but inversion runs the conditional branch alone, so
   it averages the second half of each layer's *heads*: the default here, `all_heads=True` takes them all;
3. scale the map to 0-255 by its maximum (8-bit, truncated), resize it bicubically to 256 x 256, and take
   255 - map as the background weight: a *soft* mask (the official code computes a 0.5 threshold and then
   overwrites it);
4. LPIPS(AlexNet) between input x mask and edit x mask at 256 px, both in [0, 1] as the official code feeds
   them (without LPIPS's `normalize=True`, which would map them to [-1, 1]).

The blend word's token is found with the prompt's own tokenization (`datagen.prompts.word_token_indices`, first
token of the first occurrence); the official split-by-spaces index + 1 is the same token for single-token words.
A pair whose prompt lacks the word scores nan.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from datagen.attention import AttentionHook, Site, controlled_processors
from datagen.backbone import Backbone, load_backbone
from datagen.inversions.ddim import ddim_trajectory
from datagen.prompts import word_token_indices
from distill.losses import build_lpips

SIDE = 256  # the official masks and images are compared at 256 x 256
NO_TOKEN = -1


@dataclass(eq=False)
class WordMapAverage(AttentionHook):
    """Sums one token's cross-attention map per sample over the down and up layers with `side`^2 queries.

    `tokens` holds each sample's token position (rows follow the UNet batch, one per sample: no guidance);
    `total` is B x side^2, `count` the (step, layer, head) maps summed into it."""

    side: int
    tokens: Tensor
    all_heads: bool = False
    total: Tensor | None = None
    count: int = 0

    def reads(self, site: Site, queries: int) -> bool:
        return site.cross and site.place != "mid" and queries == self.side * self.side

    def __call__(self, site: Site, probs: Tensor) -> Tensor:
        heads = probs if self.all_heads else probs[:, probs.shape[1] // 2:]  # (B, h, Q, keys)
        rows = torch.arange(len(probs), device=probs.device)
        # a sample without its word (NO_TOKEN) reads BOS: its score is nan whatever its map
        maps = heads.permute(0, 3, 1, 2)[rows, self.tokens.clamp(min=0).to(probs.device)]  # (B, h, Q)
        self.total = maps.float().sum(1) + (0 if self.total is None else self.total)
        self.count += heads.shape[1]
        return probs

    @property
    def average(self) -> Tensor:
        """B x side x side."""
        if self.total is None:
            raise ValueError(f"no down or up cross-attention layer has {self.side} x {self.side} queries")
        return (self.total / self.count).view(-1, self.side, self.side)


def coarsest_cross_side(unet: Any, latent_side: int) -> int:
    """The side of the coarsest down (and up) cross-attention layers: every down block but the last halves the side."""
    cross = [i for i, kind in enumerate(unet.config.down_block_types) if kind.startswith("CrossAttn")]
    return latent_side // 2 ** cross[-1]


def blend_token(prompt: str, word: str, tokenizer: Any) -> int:
    """The position of `word`'s first token in `prompt` (BOS at 0), or NO_TOKEN when the prompt lacks it."""
    found = word_token_indices(prompt, word, tokenizer)
    return found[0] if found else NO_TOKEN


@torch.no_grad()
def word_maps(backbone: Backbone, images: Tensor, prompts: Sequence[str], tokens: Tensor, num_steps: int = 50,
              side: int | None = None, all_heads: bool = False) -> Tensor:
    """Each image's (B x 3 x H x W in [-1, 1]) average cross-attention map of its token over a DDIM inversion with
    its prompt: B x side x side; `side` None = `coarsest_cross_side` (16 for SD at 512 px, as the official code)."""
    latents = backbone.encode_images(images)
    hook = WordMapAverage(side or coarsest_cross_side(backbone.unet, latents.shape[-1]), tokens, all_heads)
    control, processors = controlled_processors(backbone.unet)
    original = dict(backbone.unet.attn_processors)
    backbone.unet.set_attn_processor(dict(processors))  # diffusers pops the entries it installs
    try:
        with control.using(hook):
            ddim_trajectory(backbone, latents, backbone.encode_text(list(prompts)), num_steps, None, [])
    finally:
        backbone.unet.set_attn_processor(original)
    return hook.average


def background_masks(maps: Tensor, size: int = SIDE) -> Tensor:
    """Attention maps B x s x s -> the official soft background weights B x 1 x size x size in [0, 1]: the map
    scaled to 8 bits by its maximum (truncated), resized bicubically in 8 bits (PIL), subtracted from 255."""
    masks = []
    for weights in maps.float().cpu():
        foreground = (255 * weights / weights.max()).numpy().astype(np.uint8)
        resized = np.asarray(Image.fromarray(foreground).resize((size, size), Image.BICUBIC))
        masks.append(torch.from_numpy(255 - resized.astype(np.float32)) / 255)
    return torch.stack(masks).unsqueeze(1)


def masked_lpips(lpips: nn.Module, sources: Tensor, edits: Tensor, backgrounds: Tensor) -> Tensor:
    """LPIPS between `sources` and `edits` (B x 3 x H x W in [-1, 1]) resized to the masks' side, in [0, 1], both
    weighted by `backgrounds` (B x 1 x S x S): one value per pair."""
    size = backgrounds.shape[-2:]

    def prepared(images: Tensor) -> Tensor:
        images = (images.float() + 1) / 2
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return images * backgrounds.to(images.device)

    return lpips(prepared(sources), prepared(edits)).flatten().cpu()


class NSLPIPS:
    """NS-LPIPS of edits of one run: `backgrounds(inputs, prompts, words)` once per batch of inputs, then
    `score(inputs, edits, backgrounds)` for each method that edited them (teacher, student)."""

    def __init__(self, backbone: Backbone, lpips: nn.Module, num_steps: int = 50, all_heads: bool = False):
        self.backbone, self.lpips, self.num_steps, self.all_heads = backbone, lpips, num_steps, all_heads

    @classmethod
    def build(cls, model_cfg: Any, cfg: Mapping[str, Any], device: torch.device) -> NSLPIPS:
        """The run's diffusion model (its preset, `model_cfg`) and LPIPS(AlexNet) (ImageNet trunk with
        `cfg.pretrained_alex`, else a fixed random one for offline runs)."""
        lpips = build_lpips(cfg["pretrained_alex"], net="alex", seed=0, offline_hint="metrics.<preset>.ns_lpips.pretrained_alex=false")
        return cls(load_backbone(model_cfg, str(device)), lpips.to(device), cfg["steps"], cfg.get("all_heads", False))

    def backgrounds(self, inputs: Tensor, prompts: Sequence[str], words: Sequence[str]) -> tuple[Tensor, Tensor]:
        """The soft background masks of `inputs` (B x 1 x 256 x 256), each from its prompt's blend word, and which
        prompts hold their word."""
        tokens = torch.tensor([blend_token(prompt, word, self.backbone.tokenizer) for prompt, word in zip(prompts, words)])
        maps = word_maps(self.backbone, inputs.to(self.backbone.device), prompts, tokens, self.num_steps, None, self.all_heads)
        return background_masks(maps), tokens != NO_TOKEN

    @torch.no_grad()
    def score(self, inputs: Tensor, edits: Tensor, backgrounds: tuple[Tensor, Tensor]) -> Tensor:
        masks, found = backgrounds
        device = next(self.lpips.parameters()).device
        values = masked_lpips(self.lpips, inputs.to(device), edits.to(device), masks.to(device))
        return torch.where(found, values, torch.nan)
