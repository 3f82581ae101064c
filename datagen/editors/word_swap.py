"""DDIM + word swap, the pix2pix-zero paper's baseline (section 4.3; EDITORS.md section 4): the input's x_T (DDIM
inversion at guidance 1 of a real image, or a synthetic input's noise), then DDIM sampling with the target prompt
at guidance 7.5, without any attention control.

It is Prompt-to-Prompt's sampling with every control off (`plan` None). A synthetic input's source row still
samples beside the target, from the same x_T: it is the pair's input image. A real input's would only reconstruct
the image the pair already has, and without a controller it cannot influence the target, so the target samples
alone: half the UNet work.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datagen.backbone import Backbone
from datagen.editors.p2p import Plan, PromptToPrompt


class WordSwap(PromptToPrompt):
    def __init__(self, backbone: Backbone, resolution: int, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 inversion: str = "ddim", inversion_options: Mapping[str, Any] | None = None,
                 compile: bool | Mapping[str, Any] = False) -> None:
        super().__init__(backbone, resolution, num_inference_steps, guidance_scale, inversion=inversion,
                         inversion_options=inversion_options, compile=compile)

    def plan(self, sources: list[str], targets: list[str]) -> None:
        return None

    def record(self, plan: Plan | None, b: int) -> dict:
        return {}
