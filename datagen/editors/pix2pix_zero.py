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
from collections.abc import Mapping
from typing import Any

import torch

from datagen.attention import MapDistance, MapRecorder, controlled_processors
from datagen.backbone import Backbone, timesteps_for
from datagen.editors.base import EditBatch, Editor, EditResult, compiled, finite_rows, guided_noise, initial_noise
from datagen.inversions.ddim import NoiseRegularizer
from datagen.inversions import Inversion, make_inverter


class Pix2PixZero(Editor):
    uses_direction = True

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
        inversion: str = "ddim",
        offsets_to_edit: bool = True,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        if xa_update not in ("official", "shared"):
            raise ValueError(f"xa_update must be 'official' or 'shared', not {xa_update!r}")
        if inversion == "negative_prompt":
            raise ValueError("pix2pix-zero's real inputs take their caption as the negative prompt already: "
                             "inversion=ddim is negative-prompt inversion here")
        if inversion != "ddim" and num_inversion_steps != num_inference_steps:
            raise ValueError(f"inversion={inversion} keeps the source on the inversion trajectory step by step: "
                             f"num_inversion_steps ({num_inversion_steps}) must equal num_inference_steps ({num_inference_steps})")
        self.backbone, self.resolution = compiled(backbone, compile), resolution
        self.direction = direction.to(backbone.device, backbone.dtype)
        self.num_inference_steps, self.num_inversion_steps = num_inference_steps, num_inversion_steps
        self.guidance_scale, self.xa_update = guidance_scale, xa_update
        self.xa_guidance = {"real": xa_guidance_real, "synthetic": xa_guidance_synthetic}
        # The noise regularizer belongs to the inversions that run DDIM inversion on pix2pix-zero's behalf.
        self.regularizer = regularizer
        options = {"regularizer": regularizer} if inversion in ("ddim", "direct") else {}
        self.inverter = make_inverter(inversion, **options)
        # Direct inversion's offsets: PnP-Inversion's pix2pix-zero adds them to the edit too (EDITORS.md section 3).
        self.offsets_to_edit = offsets_to_edit
        self.control, self.processors = controlled_processors(backbone.unet)
        # One hook object of each kind for the editor's life: a compiled UNet meets the objects it was traced with.
        self.recorder, self.distance = MapRecorder(), MapDistance()
        self.empty_prompt = backbone.encode_text([""])

    def edit(self, batch: EditBatch) -> EditResult:
        start = time.perf_counter()
        bb, size = self.backbone, len(batch.seeds)
        cond = bb.encode_text(batch.prompts)
        if batch.images is None:
            kind, inversion = "synthetic", Inversion(self.initial_noise(batch.seeds), uncond=self.empty_prompt.expand(size, -1, -1))
        else:
            # Real images: the caption is also the negative prompt (the inversion's uncond None), so guidance
            # amplifies the edit direction alone, and the source branch's guided noise is eps_c (guidance 1).
            # Null-text inversion instead optimises the empty prompt's embedding for guidance at the editor's scale.
            generators = [torch.Generator().manual_seed(seed) for seed in batch.seeds]
            latents = bb.encode_images(batch.images * 2 - 1)
            kind = "real"
            null_text = self.inverter.name == "null_text"
            uncond, w = (self.empty_prompt.expand(size, -1, -1), self.guidance_scale) if null_text else (cond, 1.0)
            inversion = self.inverter(bb, latents, cond, uncond, self.num_inversion_steps, w, generators)
        reference, edited, xa_loss, edit_evals = self.lockstep(inversion.x_T, inversion.uncond, cond, cond + self.direction,
                                                               self.xa_guidance[kind], inversion.offsets)
        inputs = batch.images.float() if batch.images is not None else bb.decode_latents(reference)
        finite = finite_rows(edited, reference)
        if bb.device.type == "cuda":
            torch.cuda.synchronize(bb.device)
        records = [{"inversion": record} for record in inversion.records] if inversion.records else []
        return EditResult(inputs.cpu(), bb.decode_latents(edited).cpu(), finite.cpu(), inversion.unet_evals + edit_evals,
                          time.perf_counter() - start, xa_loss=xa_loss.cpu(), records=records)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        return initial_noise(self.backbone, seeds, self.resolution)

    @torch.no_grad()
    def lockstep(self, x_T: torch.Tensor, uncond: torch.Tensor | list[torch.Tensor] | None, cond: torch.Tensor,
                 cond_edit: torch.Tensor, xa_guidance: float, offsets: list[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Reference (c) and edit (c + dc) trajectories from x_T. Returns both x_0, the mean L_xa and the number of
        single-sample UNet forwards per pair. `uncond`: one null embedding, or one per step (null-text inversion),
        or None: the caption `cond` is the negative prompt. `offsets` (direct inversion) are added after each step."""
        bb, unet, scheduler, w = self.backbone, self.backbone.unet, self.backbone.scheduler, self.guidance_scale
        unet.set_attn_processor(dict(self.processors))  # diffusers pops the entries it installs
        negative_is_caption = uncond is None
        uncond_at = (lambda i: cond) if negative_is_caption else (lambda i: uncond[i] if isinstance(uncond, list) else uncond)
        x_ref = x_edit = x_T.float()
        losses = []
        for i, (t, t_device) in enumerate(timesteps_for(scheduler, self.num_inference_steps, x_ref.device)):
            null = uncond_at(i)
            with self.control.using(self.recorder):
                self.recorder.maps = maps = {}
                if negative_is_caption:  # guidance over two equal halves is the one forward itself
                    eps = unet(x_ref.to(bb.dtype), t_device, encoder_hidden_states=cond).sample.float()
                else:
                    eps = guided_noise(bb, x_ref, t_device, null, cond, w)
            if negative_is_caption:  # the guidance loss compares both edit halves with it: rows (half, sample)
                maps.update({name: torch.cat([probs, probs]) for name, probs in maps.items()})
            x_ref = scheduler.step(eps, t, x_ref).prev_sample
            x_uncond = x_cond = x_edit
            if xa_guidance > 0:
                x_in = torch.cat([x_edit, x_edit]).to(bb.dtype).requires_grad_(True)
                with torch.enable_grad(), self.control.using(self.distance.against(maps)):
                    unet(x_in, t_device, encoder_hidden_states=torch.cat([null, cond_edit]))
                    (grad,) = torch.autograd.grad(self.distance.loss.sum(), x_in)
                grad_uncond, grad_cond = grad.float().chunk(2)
                if self.xa_update == "official":  # each half takes its own step; the unconditional half goes on
                    x_uncond, x_cond = x_edit - xa_guidance * grad_uncond, x_edit - xa_guidance * grad_cond
                else:  # the paper: one x_t feeds both halves, so it takes the sum of their gradients
                    x_uncond = x_cond = x_edit - xa_guidance * (grad_uncond + grad_cond)
            with self.control.using(self.distance.against(maps)):  # L_xa of the maps this step's edit actually used
                eps = guided_noise(bb, x_cond, t_device, null, cond_edit, w, x_uncond=x_uncond)
            losses.append(torch.as_tensor(self.distance.loss, dtype=torch.float32).expand(x_ref.shape[0]))  # 0 without attn2 layers
            x_edit = scheduler.step(eps, t, x_uncond).prev_sample
            if offsets is not None:
                x_ref = x_ref + offsets[i]
                if self.offsets_to_edit:
                    x_edit = x_edit + offsets[i]
        evals_per_step = (1 if negative_is_caption else 2) + 2 * (2 if xa_guidance > 0 else 1)
        return x_ref, x_edit, torch.stack(losses).mean(0), evals_per_step * self.num_inference_steps
