"""SDEdit (Meng et al., ICLR 2022) as diffusers' `StableDiffusionImg2ImgPipeline` runs it: noise the input's
latents to an intermediate timestep t0 set by `strength`, then denoise them with the target prompt.

Per sample, one generator seeded with its seed makes every random draw, in the pipeline's order: first the
input latents' draw (a real image's VAE posterior sample; a synthetic input's x_T), then the noise that takes
them to t0. Each sample's draws are its own, so a batch edits as its samples do one at a time (to float rounding).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from datagen.backbone import Backbone
from datagen.editors.base import EditBatch, EditResult, Editor, compiled, denoise, finite_rows


class SDEdit(Editor):
    uses_target_prompts = True

    def __init__(self, backbone: Backbone, resolution: int, strength: float = 0.8, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, compile: bool | Mapping[str, Any] = False) -> None:
        # The pipeline's own rule (get_timesteps): the last k of the N timesteps, the first of them is t0.
        steps = min(int(num_inference_steps * strength), num_inference_steps)
        if not 0 < strength <= 1 or steps < 1:
            raise ValueError(f"strength must be in (0, 1] and give at least one of the {num_inference_steps} steps, "
                             f"got {strength}")
        self.backbone, self.resolution = compiled(backbone, compile), resolution
        self.strength, self.num_inference_steps, self.guidance_scale = strength, num_inference_steps, guidance_scale
        self.steps = steps
        backbone.scheduler.set_timesteps(num_inference_steps)
        self.t0 = int(backbone.scheduler.timesteps[num_inference_steps - steps])
        self.empty_prompt = backbone.encode_text([""])  # 1 x 77 x D: guidance's negative prompt, the pipeline's default

    def draw(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Each generator's next N(0, I) latent, B x C x h x w on the backbone's device. Drawn on the CPU in fp32
        (as base.initial_noise), so a seed gives the same numbers on any device, in any precision and batch
        (the pipeline draws in its own dtype: in fp32, these very numbers)."""
        shape = self.backbone.latent_shape(self.resolution)
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.backbone.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Images B x 3 x H x W in [0, 1] -> scaling_factor x a sample of the VAE posterior, B x C x h x w (fp32).
        A sample, not Backbone.encode_images' mean: the pipeline samples, with each image's generator."""
        posterior = self.backbone.vae.encode((images * 2 - 1).to(self.backbone.device, self.backbone.dtype)).latent_dist
        z0 = posterior.mean.float() + posterior.std.float() * self.draw(generators)
        return self.backbone.vae.config.scaling_factor * z0

    def add_noise(self, z0: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """z0 B x C x h x w -> z_t0 = sqrt(abar_t0) z0 + sqrt(1 - abar_t0) eps, eps each generator's next draw.
        The scheduler's add_noise computes the same but moves its alphas_cumprod table to the latents' device,
        where every later DDIM step of this shared scheduler would then index it: the host table stays put here."""
        alpha_bar = self.backbone.scheduler.alphas_cumprod[self.t0]  # 0-dim fp32, on the host
        return alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * self.draw(generators)

    def edit_latents(self, z0: torch.Tensor, generators: list[torch.Generator], target: torch.Tensor) -> torch.Tensor:
        """Input latents z0 B x C x h x w -> edited latents: noised to t0, then the last `steps` DDIM steps with
        guidance toward `target` (B x 77 x D)."""
        uncond = self.empty_prompt.expand(len(target), -1, -1)
        return denoise(self.backbone, self.add_noise(z0, generators), target, uncond, self.guidance_scale,
                       self.num_inference_steps, first_step=self.num_inference_steps - self.steps)

    def edit(self, batch: EditBatch) -> EditResult:
        if batch.target_prompts is None:
            raise ValueError("SDEdit samples with EditBatch.target_prompts, and the batch has none")
        start = time.perf_counter()
        bb, size = self.backbone, len(batch.seeds)
        generators = [torch.Generator().manual_seed(seed) for seed in batch.seeds]
        evals_per_step = 1 if self.guidance_scale == 1 else 2  # guidance 1: the conditional half alone
        if batch.images is None:
            # The input is the source prompt's own sample from x_T, the generator's first draw (so
            # base.initial_noise(seeds)); SDEdit's noise is its next one, since a fresh generator would draw x_T
            # again and push the sample back towards its own trajectory. SDEdit starts from the sample's latents:
            # the input image is their decoding, and encoding it again would only add the VAE's reconstruction
            # error and a posterior draw.
            uncond = self.empty_prompt.expand(size, -1, -1)
            z0 = denoise(bb, self.draw(generators), bb.encode_text(batch.prompts), uncond, self.guidance_scale,
                         self.num_inference_steps)  # B x C x h x w
            input_evals = evals_per_step * self.num_inference_steps
        else:
            z0, input_evals = self.encode(batch.images, generators), 0
        edited = self.edit_latents(z0, generators, bb.encode_text(batch.target_prompts))  # B x C x h x w
        inputs = bb.decode_latents(z0) if batch.images is None else batch.images.float()
        finite = finite_rows(z0, edited)
        images = bb.decode_latents(edited)
        if bb.device.type == "cuda":
            torch.cuda.synchronize(bb.device)
        records = [{"sdedit": {"strength": self.strength, "steps": self.steps, "t0": self.t0}} for _ in range(size)]
        return EditResult(inputs.cpu(), images.cpu(), finite.cpu(), input_evals + evals_per_step * self.steps,
                          time.perf_counter() - start, records=records)
