"""DDIM inversion at guidance 1, with pix2pix-zero's optional noise regularizer (datagen/inversion.py)."""
from __future__ import annotations

import torch

from datagen.backbone import Backbone
from datagen.inversion import NoiseRegularizer, ddim_invert
from datagen.inversions import Inversion, Inverter


class DDIMInversion(Inverter):
    name = "ddim"

    def __init__(self, regularizer: NoiseRegularizer | None = None) -> None:
        self.regularizer = regularizer

    def __call__(self, backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 num_steps: int, guidance_scale: float, generators: list[torch.Generator]) -> Inversion:
        x_T = ddim_invert(backbone, latents, cond, num_steps, self.regularizer, generators)
        return Inversion(x_T, unet_evals=num_steps, records=[{"method": self.name} for _ in generators])
