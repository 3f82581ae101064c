"""The contract every teacher editor keeps: an `EditBatch` in, an `EditResult` out, and the pieces they share
(x_T from a seed, classifier-free guided noise, a compiled view of the UNet)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from datagen.backbone import Backbone, timesteps_for


@dataclass
class EditBatch:
    """What to edit. `images` (B x 3 x H x W in [0, 1]) are real inputs, inverted first, with `prompts` as
    their captions; without images the inputs are synthetic: noise from `seeds`, `prompts` as source prompts.
    `target_prompts` are the prompts the edit samples with (editors that declare `uses_target_prompts`)."""

    seeds: list[int]
    prompts: list[str]
    images: torch.Tensor | None = None
    target_prompts: list[str] | None = None


@dataclass
class EditResult:
    inputs: torch.Tensor  # B x 3 x H x W in [0, 1]: the real image, or the source prompt's sample
    edited: torch.Tensor  # B x 3 x H x W in [0, 1]
    finite: torch.Tensor  # (B,) bool: False where a latent went NaN/Inf (the sample is to be rejected)
    unet_evals: int  # single-sample UNet forward passes per pair (a guidance pair counts 2)
    seconds: float
    xa_loss: torch.Tensor | None = None  # (B,) pix2pix-zero: mean over steps of L_xa of the maps each edit step used
    records: list[dict] = field(default_factory=list)  # per sample, written into its json (e.g. the inversion's losses)


class Editor(ABC):
    """Turns a batch of inputs into edited images."""

    uses_direction: ClassVar[bool] = False  # takes `direction`, the task's edit direction in text-embedding space
    uses_target_prompts: ClassVar[bool] = False  # needs `EditBatch.target_prompts`
    uses_cache_dir: ClassVar[bool] = False  # takes `cache_dir`, the run's cache folder (reusable inversions)

    @abstractmethod
    def edit(self, batch: EditBatch) -> EditResult: ...


def compiled(backbone: Backbone, compile: bool | Mapping[str, Any]) -> Backbone:
    """The backbone with the editor's own compiled view of the UNet; the backbone's stays eager for its other users."""
    if not compile:
        return backbone
    return replace(backbone, unet=torch.compile(backbone.unet, **({} if compile is True else dict(compile))))


def initial_noise(backbone: Backbone, seeds: list[int], resolution: int) -> torch.Tensor:
    """x_T per seed, drawn on the CPU so a seed gives the same noise on any device and in any batch."""
    shape = backbone.latent_shape(resolution)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(noise).to(backbone.device)


def guided_noise(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor,
                 guidance_scale: float, x_uncond: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guided noise eps_u + w (eps_c - eps_u), both halves in one UNet call on cat([x_uncond, x])
    with context cat([uncond, cond]) (x_uncond defaults to x). Guidance 1 is eps_c: one half, no unconditional call."""
    if guidance_scale == 1:
        return backbone.unet(x.to(backbone.dtype), t, encoder_hidden_states=cond).sample.float()
    x_in = torch.cat([x if x_uncond is None else x_uncond, x]).to(backbone.dtype)
    eps_uncond, eps_cond = backbone.unet(x_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.float().chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def finite_rows(*latents: torch.Tensor) -> torch.Tensor:
    """(B,) True where every given latent of the sample is finite."""
    return torch.stack([torch.isfinite(x).flatten(1).all(1) for x in latents]).all(0)


@torch.no_grad()
def denoise(backbone: Backbone, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | list[torch.Tensor],
            guidance_scale: float, num_steps: int, first_step: int = 0,
            before_step: Callable[[int], None] | None = None,
            after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance over steps `first_step`..`num_steps - 1` of a `num_steps`
    schedule. `uncond` is one null embedding for every step or one per step (null-text inversion), rows as
    `cond`. `before_step(i)` runs before step i's UNet call (attention schedules); `after_step(i, x)` may
    change the latents after the scheduler step (direct inversion's offsets, LocalBlend)."""
    scheduler = backbone.scheduler
    x = x.float()  # the trajectory stays in fp32; only the UNet runs in the backbone's precision
    for i, (t, t_device) in enumerate(timesteps_for(scheduler, num_steps, x.device)):
        if i < first_step:
            continue
        if before_step is not None:
            before_step(i)
        eps = guided_noise(backbone, x, t_device, uncond[i] if isinstance(uncond, list) else uncond, cond, guidance_scale)
        x = scheduler.step(eps, t, x).prev_sample
        if after_step is not None:
            x = after_step(i, x)
    return x
