"""Validation figures of the toy world's models, each on scenes rendered fresh from its own seed.

`python -m toyworld.evaluate [--weights toyworld/weights]` loads every model of a trained world as the
pipeline does (fp32 on the CPU), prints the table of toyworld/README.md and writes evaluation.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import (BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPSegForImageSegmentation,
                          CLIPTextModel, CLIPTokenizer)

from toyworld.data import TokenCache
from toyworld.models import WEIGHTS
from toyworld.render import render
from toyworld.world import COLOURS, SHAPES, Scenes, captions, sample_scenes

SHAPE_TEXTS = [f"a {shape}" for shape in SHAPES]
COLOUR_TEXTS = [f"a {colour} shape" for colour in COLOURS]
# img2img from unrelated scenes: 0.8 of the schedule (t = 781 of 1000) keeps only their coarse layout.
IMG2IMG_STRENGTH = 0.8


def _single_objects(n: int, seed: int, device: torch.device) -> tuple[Scenes, torch.Tensor]:
    scenes = sample_scenes(n, seed, two_object_prob=0.0, held_out="any")
    return scenes, render(scenes, device)[0] * 2 - 1


@torch.no_grad()
def clip_classify(clip, tokens: TokenCache, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Index of the text each image (in [-1, 1]) matches best."""
    ids = tokens(texts, images.device)
    return clip(input_ids=ids, pixel_values=images.to(clip.dtype)).logits_per_image.argmax(-1).cpu()


def clip_judges_right(clip, tokens: TokenCache, images: torch.Tensor, scenes: Scenes, attribute: str) -> np.ndarray:
    """Per image: does the CLIP's zero-shot pick ("a star"; "a red shape") name the first object's
    `attribute` ("shape" or "colour")?"""
    texts = SHAPE_TEXTS if attribute == "shape" else COLOUR_TEXTS
    return clip_classify(clip, tokens, images, texts).numpy() == getattr(scenes, attribute)[:, 0]


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] through the posterior mean and back."""
    return vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)


@torch.no_grad()
def clip_zero_shot(clip, tokens: TokenCache, n: int, seed: int, device: torch.device) -> dict[str, float]:
    """Shape and colour accuracy of zero-shot prompts ("a star", "a red shape") on single objects."""
    scenes, images = _single_objects(n, seed, device)
    return {f"clip_{attribute}_acc": float(clip_judges_right(clip, tokens, images, scenes, attribute).mean())
            for attribute in ("shape", "colour")}


@torch.no_grad()
def vae_psnr(vae, n: int, seed: int, device: torch.device) -> dict[str, float]:
    """Reconstruction PSNR (dB, images in [0, 1]) through the posterior mean."""
    images = render(sample_scenes(n, seed, held_out="any"), device)[0] * 2 - 1
    mse = ((reconstruct(vae, images) - images) / 2).pow(2).flatten(1).mean(1)
    return {"vae_psnr_db": float((-10 * torch.log10(mse)).mean())}


@torch.no_grad()
def vae_colour_acc(vae, clip, tokens: TokenCache, n: int, seed: int, device: torch.device) -> dict[str, float]:
    """Share of reconstructions of single objects whose colour the CLIP still names right (PSNR hides a
    decoder that greys out a small object's colour)."""
    scenes, images = _single_objects(n, seed, device)
    return {"vae_clip_colour_acc": float(clip_judges_right(clip, tokens, reconstruct(vae, images), scenes, "colour").mean())}


def diffusion_samples(pipeline: StableDiffusionPipeline, prompts: list[str], seed: int, steps: int = 50,
                      guidance: float = 5.0, starts: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """DDIM samples in [-1, 1] for prompts, through diffusers' own pipelines: from pure noise, or with `starts`
    (images in [-1, 1]) noised to `strength` of the schedule and denoised from there (img2img)."""
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    common = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt")
    if starts is None:
        images = pipeline(prompts, height=size, width=size, **common).images
    else:
        img2img = StableDiffusionImg2ImgPipeline(**pipeline.components, requires_safety_checker=False)
        img2img.set_progress_bar_config(disable=True)
        images = img2img(prompts, image=(starts + 1) / 2, strength=strength, **common).images
    return images * 2 - 1


@torch.no_grad()
def diffusion_accuracy(pipeline: StableDiffusionPipeline, clip, tokens: TokenCache, n: int, seed: int,
                       steps: int = 50, guidance: float = 5.0,
                       strength: float | None = None) -> tuple[dict[str, float], torch.Tensor, list[str]]:
    """Samples for held-out captions (never trained on), judged by the toy CLIP: share with the caption's
    shape, colour, and both. Returns the figures, the samples and their captions.

    With `strength` the samples start from *unrelated* fresh scenes noised that far (img2img) instead of pure
    noise: the figure then tells whether the UNet knows the captions, apart from whether it can draw a layout out
    of pure noise (toyworld/README.md, "The committed world")."""
    scenes = sample_scenes(n, seed, two_object_prob=0.0, held_out="only")
    prompts = captions(scenes)
    starts = None if strength is None else render(sample_scenes(n, seed + 1), pipeline.device)[0] * 2 - 1
    images = diffusion_samples(pipeline, prompts, seed, steps, guidance, starts, strength or 1.0)
    shape, colour = (clip_judges_right(clip, tokens, images, scenes, attribute) for attribute in ("shape", "colour"))
    suffix = "" if strength is None else f"_img2img_{strength}"
    figures = {f"diffusion_shape_acc{suffix}": float(shape.mean()), f"diffusion_colour_acc{suffix}": float(colour.mean()),
               f"diffusion_match{suffix}": float((shape & colour).mean())}
    return figures, images, prompts


@torch.no_grad()
def segmenter_iou(segmenter, tokens: TokenCache, n: int, seed: int, device: torch.device) -> dict[str, float]:
    """Mean IoU of the mask for the first object's shape word ("circle") against all objects of that shape."""
    scenes = sample_scenes(n, seed, held_out="any")
    images, masks = render(scenes, device)
    words = [SHAPES[s] for s in scenes.shape[:, 0]]
    same_shape = torch.as_tensor(scenes.present & (scenes.shape == scenes.shape[:, :1]), device=device)
    target = (masks * same_shape[..., None, None]).amax(1) > 0.5
    logits = segmenter(input_ids=tokens(words, device), pixel_values=images * 2 - 1).logits
    return {"segmenter_iou": float(masks_iou(logits > 0, target).mean())}


@torch.no_grad()
def captioner_exact_match(captioner, processor, n: int, seed: int, device: torch.device) -> dict[str, float]:
    """Share of fresh renders whose greedy caption equals the full caption, word for word."""
    scenes = sample_scenes(n, seed, held_out="any")
    images = render(scenes, device)[0] * 2 - 1
    ids = captioner.generate(pixel_values=images, max_new_tokens=30)
    predicted = processor.batch_decode(ids, skip_special_tokens=True)
    return {"captioner_exact_match": float(np.mean([p.strip() == c for p, c in zip(predicted, captions(scenes))]))}


def masks_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks N x H x W, per item."""
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp_min(1)



def evaluate_world(weights: Path, n: int = 512, n_diffusion: int = 128, device: torch.device = torch.device("cpu")) -> dict:
    """Every figure of the world in `weights`, on the same seeds whatever trained it."""
    def load(cls, folder: str):
        return cls.from_pretrained(weights / folder, torch_dtype=torch.float32).to(device).eval()

    clip, vae = load(CLIPModel, "clip"), load(AutoencoderKL, "vae")
    tokens = TokenCache(CLIPTokenizer.from_pretrained(weights / "tokenizer"))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=load(CLIPTextModel, "text_encoder"), tokenizer=tokens.tokenizer,
        unet=load(UNet2DConditionModel, "unet"), scheduler=DDIMScheduler.from_pretrained(weights / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    figures = {**clip_zero_shot(clip, tokens, n, 2001, device), **vae_psnr(vae, n, 2002, device),
               **vae_colour_acc(vae, clip, tokens, n, 2006, device),
               **diffusion_accuracy(pipeline, clip, tokens, n_diffusion, 2003)[0],
               **{name: value for name, value in diffusion_accuracy(pipeline, clip, tokens, n_diffusion, 2003,
                                                                    strength=IMG2IMG_STRENGTH)[0].items() if "match" in name},
               **segmenter_iou(load(CLIPSegForImageSegmentation, "segmenter"), tokens, n, 2004, device),
               **captioner_exact_match(load(BlipForConditionalGeneration, "captioner"),
                                       BlipProcessor.from_pretrained(weights / "captioner"), n, 2005, device)}
    return {name: round(value, 4) for name, value in figures.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validation figures of a trained toy world.")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--n", type=int, default=512, help="fresh scenes per figure")
    parser.add_argument("--n-diffusion", type=int, default=128, help="held-out captions sampled")
    args = parser.parse_args(argv)
    figures = evaluate_world(args.weights, args.n, args.n_diffusion)
    (args.weights / "evaluation.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("| figure | value |\n| --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
