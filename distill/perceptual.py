"""A perceptual distance that needs no download: LPIPS's form on the hidden states of a CLIP vision tower on disk.

LPIPS (Zhang et al. 2018) compares unit-normalised feature maps of a frozen ImageNet network, layer by layer, and
averages the squared differences over positions. Without ImageNet weights (the toy world has no hub), the trained
network that knows its images is its CLIP's ViT: trained to tell a circle from a square, its tokens encode exactly
the shape an L1 regression blurs. This is LPIPS's "baseline" variant (every channel weighted 1, no learned linear
heads, which were fitted to VGG's channels and mean nothing on another trunk):

    d(x, y) = sum_l mean_t || f_l(x)_t / |f_l(x)_t| - f_l(y)_t / |f_l(y)_t| ||^2

over the patch tokens t of the tower's layers l (the embeddings, then each encoder layer's output). Real data keep
LPIPS(VGG) (`distill.losses.build_lpips`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from filters.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_processor, pixel_transform


class ClipVisionLpips(nn.Module):
    """LPIPS-baseline on a frozen transformers CLIP vision tower: (B x 3 x H x W, same) in [-1, 1] -> B x 1 x 1 x 1,
    as `lpips.LPIPS` returns. `layers` indexes the tower's hidden states (0 = patch embeddings; None = all)."""

    def __init__(self, name_or_path: str, layers: Sequence[int] | None = None):
        super().__init__()
        from transformers import CLIPVisionModel
        from transformers.utils import logging

        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # a CLIPModel folder: the text tower's weights are left out, as intended
        logging.disable_progress_bar()  # a loading bar per training run says nothing
        try:
            self.tower = CLIPVisionModel.from_pretrained(name_or_path, torch_dtype=torch.float32)
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
        self.tower.eval().requires_grad_(False)
        _, processor = load_processor(name_or_path)
        mean, std = (processor.image_mean, processor.image_std) if processor else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        side = self.tower.config.image_size
        self.preprocess = pixel_transform((side, side), mean, std, "bicubic")
        self.layers = None if layers is None else list(layers)

    def train(self, mode: bool = True) -> ClipVisionLpips:
        return super().train(False)  # a fixed metric: no dropout, whatever mode the module around it is put in

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        images = self.preprocess((torch.cat([output, target]).float() + 1) / 2)
        states = self.tower(pixel_values=images, output_hidden_states=True).hidden_states
        chosen = states if self.layers is None else [states[i] for i in self.layers]
        distance = output.new_zeros(len(output), dtype=torch.float32)
        for state in chosen:
            features = F.normalize(state[:, 1:].float(), dim=-1, eps=1e-10)  # patch tokens; the class token pools them
            x, y = features.chunk(2)
            distance = distance + (x - y).square().sum(-1).mean(-1)
        return distance.view(-1, 1, 1, 1)
