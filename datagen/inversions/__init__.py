"""Inversions of real images for the editors (`editor.inversion=`): each turns an image's latents into where
sampling starts, and what keeps the source branch on the image while the editor samples.

- `ddim`: deterministic DDIM inversion at guidance 1 (pix2pix-zero adds its noise regularizer).
- `null_text`: DDIM inversion, then a per-step null embedding optimised so guided sampling retraces it.
- `negative_prompt`: the source prompt as every step's null embedding, no optimisation.
- `direct`: per-step offsets that put the source branch back on the inversion trajectory.

StyleDiffusion's inversion (`stylediffusion.py`: per-step mapping networks from the image's CLIP tokens to the
value input of the cross-attention layers) is editor=stylediffusion's own, not a choice for the others: it needs
the image itself and an editor that applies the value input.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from datagen.backbone import Backbone


@dataclass
class Inversion:
    """Where the sampler starts and how the source branch stays on the image; per input, batched."""

    x_T: torch.Tensor  # B x C x h x w, fp32
    uncond: list[torch.Tensor] | None = None  # per sampling step, B x 77 x D: the source's null embedding
    offsets: list[torch.Tensor] | None = None  # per sampling step, B x C x h x w, added to the source branch after it
    # per sampling step, (scale, shift), B x 77 x D each: the conditional branch's value input c * scale + shift
    values: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    unet_evals: int = 0  # single-sample UNet forwards per input
    records: list[dict] = field(default_factory=list)  # per input, for the pair's json


class Inverter(ABC):
    """`__call__(backbone, latents, cond, uncond, num_steps, guidance_scale, generators)`: `cond` is the source
    prompt's embedding, `uncond` the null embedding the editor's source branch samples with (B x 77 x D each),
    `guidance_scale` the editor's; `generators` are the samples' own, for anything random."""

    name: str

    @abstractmethod
    def __call__(self, backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 num_steps: int, guidance_scale: float, generators: list[torch.Generator]) -> Inversion: ...


INVERTERS = {"ddim": "ddim.DDIMInversion", "null_text": "null_text.NullTextInversion",
             "negative_prompt": "negative_prompt.NegativePromptInversion", "direct": "direct.DirectInversion"}


def make_inverter(name: str, **options) -> Inverter:
    """The inversion called `name`, with its options (e.g. pix2pix-zero's `regularizer`)."""
    if name not in INVERTERS:
        raise ValueError(f"unknown inversion {name!r}; one of {', '.join(INVERTERS)}")
    module, cls = INVERTERS[name].split(".")
    return getattr(importlib.import_module(f"datagen.inversions.{module}"), cls)(**options)
