"""pix2pix-zero (METHOD.md section 3): a reference pass and an edit pass with cross-attention guidance,
run in lockstep over a batch, so step t's reference maps are used as soon as they are made.

The official code runs one image at a time, the whole reference pass first with every map of every step
kept on the CPU, and materialises every self-attention matrix. Here each step is: reference forward
(maps recorded), guidance forward + backward on the edit latents, guided forward; all batched, with
fused attention everywhere but the cross-attention layers whose maps are read. For real inputs the
caption is also the negative prompt, so the reference pass's two guidance halves are one forward twice:
it runs once (5 single-sample UNet forwards per pair and step instead of the official 6).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from datagen.attention import cross_attention_processors
from datagen.backbone import Backbone, timesteps_for
from datagen.inversion import NoiseRegularizer, ddim_invert


@dataclass
class EditBatch:
    """What to edit. `images` (B x 3 x H x W in [0, 1]) are real inputs, inverted first, with `prompts` as
    their captions; without images the inputs are synthetic: noise from `seeds`, `prompts` as source prompts."""

    seeds: list[int]
    prompts: list[str]
    images: torch.Tensor | None = None


@dataclass
class EditResult:
    inputs: torch.Tensor  # B x 3 x H x W in [0, 1]: the real image, or the reference pass's image
    edited: torch.Tensor  # B x 3 x H x W in [0, 1]
    finite: torch.Tensor  # (B,) bool: False where a latent went NaN/Inf (the sample is to be rejected)
    xa_loss: torch.Tensor  # (B,) mean over steps of L_xa of the maps each edit step used (after guidance)
    unet_evals: int  # single-sample UNet forward passes per pair (a guidance pair counts 2)
    seconds: float
    extras: dict = field(default_factory=dict)


class Editor(ABC):
    """Turns a batch of inputs into edited images. Other editors (word swap, SDEdit, prompt-to-prompt)
    implement the same call."""

    @abstractmethod
    def edit(self, batch: EditBatch) -> EditResult: ...


class Pix2PixZero(Editor):
    def __init__(
        self,
        backbone: Backbone,
        direction: torch.Tensor,
        resolution: int,
        num_inference_steps: int = 50,
        num_inversion_steps: int = 50,
        guidance_scale: float = 5.0,
        xa_guidance_real: float = 0.1,
        xa_guidance_synthetic: float = 0.15,
        xa_update: str = "official",
        regularizer: NoiseRegularizer | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        if xa_update not in ("official", "shared"):
            raise ValueError(f"xa_update must be 'official' or 'shared', not {xa_update!r}")
        self.backbone, self.resolution = backbone, resolution
        self.direction = direction.to(backbone.device, backbone.dtype)
        self.num_inference_steps, self.num_inversion_steps = num_inference_steps, num_inversion_steps
        self.guidance_scale, self.xa_update, self.regularizer = guidance_scale, xa_update, regularizer
        self.xa_guidance = {"real": xa_guidance_real, "synthetic": xa_guidance_synthetic}
        self.store, self.processors = cross_attention_processors(backbone.unet)
        if compile:  # the editor's own compiled view of the UNet: the backbone's stays eager for its other users
            options = {} if compile is True else dict(compile)
            self.backbone = replace(backbone, unet=torch.compile(backbone.unet, **options))
        self.empty_prompt = backbone.encode_text([""])

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """x_T per seed, drawn on the CPU so a seed gives the same noise on any device and in any batch."""
        shape = self.backbone.latent_shape(self.resolution)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        return torch.stack(noise).to(self.backbone.device)

    def edit(self, batch: EditBatch) -> EditResult:
        start = time.perf_counter()
        bb, size = self.backbone, len(batch.seeds)
        bb.unet.set_attn_processor(dict(self.processors))  # diffusers pops the entries it installs
        cond = bb.encode_text(batch.prompts)
        if batch.images is None:
            kind, uncond, x_T, inversion_evals = "synthetic", self.empty_prompt.expand(size, -1, -1), self.initial_noise(batch.seeds), 0
        else:
            # Real images: the caption is also the negative prompt, so guidance amplifies the edit direction alone.
            generators = [torch.Generator().manual_seed(seed) for seed in batch.seeds]
            latents = bb.encode_images(batch.images * 2 - 1)
            x_T = ddim_invert(bb, latents, cond, self.num_inversion_steps, self.regularizer, generators)
            kind, uncond, inversion_evals = "real", None, self.num_inversion_steps
        reference, edited, xa_loss, edit_evals = self.lockstep(x_T, uncond, cond, cond + self.direction, self.xa_guidance[kind])
        inputs = batch.images.float() if batch.images is not None else bb.decode_latents(reference)
        finite = torch.isfinite(edited).flatten(1).all(1) & torch.isfinite(reference).flatten(1).all(1)
        if bb.device.type == "cuda":
            torch.cuda.synchronize(bb.device)
        return EditResult(inputs.cpu(), bb.decode_latents(edited).cpu(), finite.cpu(), xa_loss.cpu(),
                          inversion_evals + edit_evals, time.perf_counter() - start)

    def _eps(self, x_uncond: torch.Tensor, x_cond: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Classifier-free guided noise for a batch whose two halves may hold different latents."""
        x = torch.cat([x_uncond, x_cond]).to(self.backbone.dtype)
        eps_uncond, eps_cond = self.backbone.unet(x, t, encoder_hidden_states=context).sample.float().chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def lockstep(self, x_T: torch.Tensor, uncond: torch.Tensor | None, cond: torch.Tensor, cond_edit: torch.Tensor,
                 xa_guidance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Reference (c) and edit (c + dc) trajectories from x_T. Returns both x_0, the mean L_xa and the
        number of single-sample UNet forwards per pair. `uncond` None: the caption `cond` is the negative prompt."""
        negative_is_caption, uncond = uncond is None, cond if uncond is None else uncond
        scheduler, unet = self.backbone.scheduler, self.backbone.unet
        ctx_ref, ctx_edit = torch.cat([uncond, cond]), torch.cat([uncond, cond_edit])
        x_ref = x_edit = x_T.float()
        losses = []
        for t, t_device in timesteps_for(scheduler, self.num_inference_steps, x_T.device):
            with self.store.recording() as maps:
                if negative_is_caption:  # guidance over two equal halves is the one forward itself
                    eps = unet(x_ref.to(self.backbone.dtype), t_device, encoder_hidden_states=cond).sample.float()
                else:
                    eps = self._eps(x_ref, x_ref, t_device, ctx_ref)
            if negative_is_caption:  # the guidance loss compares both edit halves with it: rows (half, sample, head)
                maps.update({name: torch.cat([probs, probs]) for name, probs in maps.items()})
            x_ref = scheduler.step(eps, t, x_ref).prev_sample
            x_uncond = x_cond = x_edit
            if xa_guidance > 0:
                x_in = torch.cat([x_edit, x_edit]).to(self.backbone.dtype).requires_grad_(True)
                with torch.enable_grad(), self.store.guiding(maps) as guide:
                    unet(x_in, t_device, encoder_hidden_states=ctx_edit)
                    (grad,) = torch.autograd.grad(guide.loss.sum(), x_in)
                grad_uncond, grad_cond = grad.float().chunk(2)
                if self.xa_update == "official":  # each half takes its own step; the unconditional half goes on
                    x_uncond, x_cond = x_edit - xa_guidance * grad_uncond, x_edit - xa_guidance * grad_cond
                else:  # the paper: one x_t feeds both halves, so it takes the sum of their gradients
                    x_uncond = x_cond = x_edit - xa_guidance * (grad_uncond + grad_cond)
            with self.store.guiding(maps) as measure:  # L_xa of the maps this step's edit actually used
                eps = self._eps(x_uncond, x_cond, t_device, ctx_edit)
            losses.append(torch.as_tensor(measure.loss, dtype=torch.float32).expand(x_T.shape[0]))  # 0 without attn2 layers
            x_edit = scheduler.step(eps, t, x_uncond).prev_sample
        evals_per_step = (1 if negative_is_caption else 2) + 2 * (2 if xa_guidance > 0 else 1)
        return x_ref, x_edit, torch.stack(losses).mean(0), evals_per_step * self.num_inference_steps
