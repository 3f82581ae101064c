"""Direct Inversion (PnP Inversion, Ju et al., ICLR 2024; EDITORS.md section 3): DDIM inversion at guidance 1,
then per sampling step the offset that puts the guided source branch back on the inversion trajectory.

The official code's offset pass samples the source and target rows ([z; z] with [C_src; C_tgt]) and keeps only
the source row's offset, which never depends on the target prompt. We sample the source rows alone: half the
official extra pass, the same offsets."""
from __future__ import annotations

import torch

from datagen.backbone import Backbone
from datagen.editors.base import denoise
from datagen.inversions.ddim import NoiseRegularizer, ddim_trajectory
from datagen.inversions import Inversion, Inverter


class DirectInversion(Inverter):
    """`regularizer`: pix2pix-zero's noise regularizer for the inversion (None: plain DDIM)."""

    name = "direct"

    def __init__(self, regularizer: NoiseRegularizer | None = None) -> None:
        self.regularizer = regularizer

    def __call__(self, backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 num_steps: int, guidance_scale: float, generators: list[torch.Generator]) -> Inversion:
        trajectory = ddim_trajectory(backbone, latents, cond, num_steps, self.regularizer, generators)  # z*_0..z*_N
        offsets: list[torch.Tensor] = []  # o_i, B x C x h x w

        def land_on_trajectory(i: int, x: torch.Tensor) -> torch.Tensor:
            offsets.append(trajectory[num_steps - 1 - i] - x)
            return x + offsets[-1]

        # The editor's own sampler makes the offsets: step i starts from exactly the latents the source branch
        # will have there (x_T, then each step's landing point plus its offset), so o_i is what that step misses.
        denoise(backbone, trajectory[-1], cond, uncond, guidance_scale, num_steps, after_step=land_on_trajectory)
        unet_evals = num_steps * (1 + (1 if guidance_scale == 1 else 2))  # inversion + offset pass (a CFG pair is 2)
        return Inversion(trajectory[-1], offsets=offsets, unet_evals=unet_evals,
                         records=[{"method": self.name} for _ in generators])
