"""Stable Diffusion components (UNet, VAE, text encoder, tokenizer, DDIM schedulers) behind one object.

Loaded by hub id or local folder for users, or built in code with random weights (`model=tiny`) for
tests and smoke runs. Either way the editor sees the same `Backbone`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from datagen.runtime import model_unavailable, resolve_device, resolve_dtype
from datagen.tokenizer import clip_tokenizer


@dataclass
class Backbone:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    inverse_scheduler: DDIMInverseScheduler
    name: str

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    def to(self, device: torch.device, dtype: torch.dtype) -> "Backbone":
        # diffusers warns at every cast of a model, even one with no module to keep in fp32 ("[]"): noise at each start
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            for module in (self.unet, self.vae, self.text_encoder):
                module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        return self

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Last hidden states, N x 77 x D, exactly as StableDiffusionPipeline conditions the UNet."""
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0].to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x H x W in [-1, 1] -> latents. The posterior mean, not a sample: inversion is then
        deterministic (the official code samples unseeded)."""
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images B x 3 x H x W in [0, 1], float32."""
        images = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def timesteps_for(scheduler: DDIMScheduler | DDIMInverseScheduler, num_steps: int,
                  device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each of the `num_steps` timesteps twice: on the host for `scheduler.step`, which indexes its host tables
    with it and compares it in Python, and on `device` for the UNet. With device timesteps (diffusers'
    pipelines) every step reads them back, each read waiting for the GPU to finish the queued UNet work."""
    scheduler.set_timesteps(num_steps)
    return list(zip(scheduler.timesteps, scheduler.timesteps.to(device)))


def _schedulers(scheduler: DDIMScheduler) -> tuple[DDIMScheduler, DDIMInverseScheduler]:
    scheduler = DDIMScheduler.from_config(scheduler.config)
    return scheduler, DDIMInverseScheduler.from_config(scheduler.config)


def load_pretrained(source: str, name: str, revision: str | None = None, variant: str | None = None,
                    dtype: torch.dtype | None = None) -> Backbone:
    """Components of a diffusers Stable Diffusion folder or hub repository, loaded straight into `dtype`
    (None: as stored), so fp16 files never pass through a full fp32 copy and back."""
    kwargs: dict[str, Any] = {"revision": revision, "variant": variant, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as error:  # hub/offline/missing-file errors are OSError subclasses
        raise model_unavailable("Stable Diffusion model", source, error) from None
    return Backbone(unet, vae, text_encoder, tokenizer, *_schedulers(scheduler), name=name)


def tiny_backbone(seed: int = 0, unet_channels: tuple[int, ...] = (32, 64), vae_channels: tuple[int, ...] = (32, 64),
                  text_dim: int = 32, text_layers: int = 2, attention_head_dim: int = 8) -> Backbone:
    """Random-weight components of SD's classes and schedule, small enough for a CPU test (diffusers-test style).

    The tokenizer is the real CLIP BPE, so sentence banks tokenize as they do for SD."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=tuple(unet_channels), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=text_dim, attention_head_dim=attention_head_dim, norm_num_groups=min(32, unet_channels[0]),
    )
    vae = AutoencoderKL(
        block_out_channels=tuple(vae_channels), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels), up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        norm_num_groups=min(32, vae_channels[0]),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_dim, intermediate_size=4 * text_dim, num_hidden_layers=text_layers,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return Backbone(unet, vae, text_encoder, clip_tokenizer(), *_schedulers(scheduler), name="tiny")


def load_backbone(model_cfg: Any, device: str = "auto") -> Backbone:
    """Build the preset `model_cfg` (conf/model/*.yaml) on `device` in the preset's precision."""
    torch_device = resolve_device(device)
    dtype = resolve_dtype(model_cfg.get("dtype", "auto"), torch_device)
    if model_cfg.get("tiny") is not None:
        backbone = tiny_backbone(**model_cfg.tiny)
    else:
        source = model_cfg.path or model_cfg.id
        if model_cfg.path is not None and not Path(model_cfg.path).exists():
            raise model_unavailable("Stable Diffusion model", model_cfg.path, FileNotFoundError("no such folder"))
        backbone = load_pretrained(source, model_cfg.name, model_cfg.get("revision"), model_cfg.get("variant"), dtype)
    return backbone.to(torch_device, dtype)
