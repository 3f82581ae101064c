"""Negative-prompt inversion (Miyake et al., arXiv 2305.16807): DDIM inversion at guidance 1, then the source
prompt as every sampling step's null embedding, so the source branch's guided noise is eps_c at any guidance and
retraces the inversion; null-text inversion's optimisation is skipped (EDITORS.md section 2)."""
from __future__ import annotations

from dataclasses import replace

import torch

from datagen.backbone import Backbone
from datagen.inversions import Inversion
from datagen.inversions.ddim import DDIMInversion


class NegativePromptInversion(DDIMInversion):
    """x_T as `ddim` gives it (pix2pix-zero's `regularizer` included), with `uncond` = [cond] * num_steps."""

    name = "negative_prompt"

    def __call__(self, backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 num_steps: int, guidance_scale: float, generators: list[torch.Generator]) -> Inversion:
        inversion = super().__call__(backbone, latents, cond, uncond, num_steps, guidance_scale, generators)
        return replace(inversion, uncond=[cond] * num_steps)  # B x 77 x D per step
