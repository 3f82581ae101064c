"""Train the whole toy world from scratch: `python -m toyworld.train [--device cuda] [--out toyworld/weights]`.

Stages run in order, each saving its model with `save_pretrained` (fp16 safetensors) into the layout
the engine loads as `model=toy`: clip/ (then text_encoder/, its text tower, and tokenizer/), vae/,
unet/ + scheduler/, segmenter/, captioner/. Every batch is rendered fresh from the seed, so the same
command and seed remake the same world (up to the device's float order). `summary.json` records the
command, device, seed, time and validation figures of each stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image

from datagen.runtime import resolve_device
from toyworld import evaluate, models
from toyworld.data import Batch, TokenCache, batches, segmentation_prompts

WEIGHTS = Path(__file__).resolve().parent / "weights"


@dataclass
class Stage:
    steps: int
    batch_size: int
    lr: float


@dataclass
class TrainConfig:
    out: Path = WEIGHTS
    device: str = "auto"
    seed: int = 0
    steps_scale: float = 1.0   # < 1 for smoke runs; the committed world used 1.0
    clip: Stage = field(default_factory=lambda: Stage(1200, 512, 2e-3))
    vae: Stage = field(default_factory=lambda: Stage(800, 256, 1e-3))
    unet: Stage = field(default_factory=lambda: Stage(3000, 512, 1e-3))
    segmenter: Stage = field(default_factory=lambda: Stage(800, 256, 1e-3))
    captioner: Stage = field(default_factory=lambda: Stage(800, 256, 1e-3))
    caption_dropout: float = 0.1   # empty prompts, so classifier-free guidance works
    eval_size: int = 512
    eval_diffusion_size: int = 128


def preset(name: str, **overrides) -> TrainConfig:
    """"gpu": batches and steps for one H100 (~10 minutes at the rates in README.md). "cpu": smaller
    batches and fewer steps, for a CPU (weaker models)."""
    if name == "cpu":
        overrides = dict(clip=Stage(600, 128, 2e-3), vae=Stage(400, 64, 1e-3), unet=Stage(1500, 64, 1e-3),
                         segmenter=Stage(300, 64, 1e-3), captioner=Stage(300, 64, 1e-3), eval_size=256,
                         eval_diffusion_size=64) | overrides
    return TrainConfig(**overrides)


class Progress:
    def __init__(self, name: str, steps: int) -> None:
        self.name, self.steps, self.start = name, steps, time.time()

    def __call__(self, step: int, loss: torch.Tensor) -> None:
        if step % max(1, self.steps // 10) == 0 or step == self.steps:
            rate = step / max(time.time() - self.start, 1e-9)
            print(f"[{self.name}] step {step}/{self.steps} loss {loss.item():.4f} ({rate:.1f} steps/s)", flush=True)


def optimise(name: str, params, stage: Stage, scale: float, data, loss_fn, ema: EMAModel | None = None) -> float:
    """AdamW, 5% warm-up then cosine decay over `stage.steps * scale` steps; returns seconds spent."""
    steps = max(1, round(stage.steps * scale))
    params = [p for p in params if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, stage.lr, total_steps=steps, pct_start=0.05)
    progress = Progress(name, steps)
    for step in range(1, steps + 1):
        loss = loss_fn(next(data))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        if ema is not None:
            ema.step(params)
        progress(step, loss)
    return time.time() - progress.start


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def save(module, path: Path) -> None:
    """fp16 safetensors: the whole world fits the repository's 25 MB budget this way."""
    module.to(torch.float16).save_pretrained(path)
    module.to(torch.float32)


def save_processor(processor, path: Path) -> None:
    """Tokenizers save pretty-printed JSON (3.6 MB for CLIP's BPE); three compact copies fit the budget."""
    processor.save_pretrained(path)
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.exists():
        tokenizer_file.write_text(json.dumps(json.loads(tokenizer_file.read_text()), separators=(",", ":"), ensure_ascii=False))


def train_clip(cfg: TrainConfig, device: torch.device, tokens: TokenCache) -> tuple:
    clip = models.clip_model().to(device).train()

    def loss_fn(batch: Batch) -> torch.Tensor:
        # Equal captions are all positives (partial captions like "a circle" repeat within a batch).
        ids = torch.as_tensor(np.unique(batch.captions, return_inverse=True)[1], device=device)
        same = (ids[:, None] == ids[None, :]).float()
        with autocast(device):
            logits = clip(input_ids=tokens(batch.captions, device), pixel_values=batch.images).logits_per_text
        target = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.float().t(), target)) / 2

    data = batches(cfg.clip.batch_size, cfg.seed + 1, device, partial_prob=0.5, twins=True)
    seconds = optimise("clip", clip.parameters(), cfg.clip, cfg.steps_scale, data, loss_fn)
    clip.eval()
    figures = evaluate.clip_zero_shot(clip, tokens, cfg.eval_size, cfg.seed + 101, device)
    save(clip, cfg.out / "clip")
    save_processor(models.clip_processor(), cfg.out / "clip")
    save(clip.text_model, cfg.out / "text_encoder")  # a CLIPTextModel: SD's text encoder class
    save_processor(models.text_tokenizer(), cfg.out / "tokenizer")
    return clip, clip.text_model, figures, seconds


def train_vae(cfg: TrainConfig, device: torch.device) -> tuple:
    vae = models.autoencoder().to(device).train()
    kl_weight = 1e-6  # as SD's autoencoder: latents stay nearly deterministic, scaled afterwards

    def loss_fn(batch: Batch) -> torch.Tensor:
        with autocast(device):
            posterior = vae.encode(batch.images).latent_dist
            decoded = vae.decode(posterior.sample()).sample.float()
        return F.l1_loss(decoded, batch.images) + F.mse_loss(decoded, batch.images) + kl_weight * posterior.kl().mean()

    data = batches(cfg.vae.batch_size, cfg.seed + 2, device)
    seconds = optimise("vae", vae.parameters(), cfg.vae, cfg.steps_scale, data, loss_fn)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(next(batches(1024, cfg.seed + 3, device)).images).latent_dist.sample()
    # SD's rule: scale latents to unit variance for the diffusion model (SD 1.x: 0.18215).
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    figures = evaluate.vae_psnr(vae, cfg.eval_size, cfg.seed + 102, device)
    figures["vae_scaling_factor"] = vae.config.scaling_factor
    save(vae, cfg.out / "vae")
    return vae, figures, seconds


def train_unet(cfg: TrainConfig, device: torch.device, tokens: TokenCache, vae, text_encoder, clip) -> tuple:
    unet = models.unet().to(device).train()
    scheduler = models.scheduler()
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    ema.to(device)
    alphas = scheduler.alphas_cumprod.to(device)
    drop_rng = np.random.default_rng(cfg.seed + 4)

    def loss_fn(batch: Batch) -> torch.Tensor:
        prompts = [c if drop_rng.random() >= cfg.caption_dropout else "" for c in batch.captions]
        with torch.no_grad(), autocast(device):
            latents = vae.encode(batch.images).latent_dist.sample() * vae.config.scaling_factor
            context = text_encoder(tokens(prompts, device))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents.float() + (1 - a).sqrt() * noise
        with autocast(device):
            prediction = unet(noisy, t, context.float()).sample
        return F.mse_loss(prediction.float(), noise)

    data = batches(cfg.unet.batch_size, cfg.seed + 5, device, partial_prob=0.3)
    seconds = optimise("unet", unet.parameters(), cfg.unet, cfg.steps_scale, data, loss_fn, ema=ema)
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=models.text_tokenizer(), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    figures, samples, prompts = evaluate.diffusion_accuracy(pipeline, clip, tokens, cfg.eval_diffusion_size,
                                                            cfg.seed + 103)
    save_image(F.interpolate((samples[:64] + 1) / 2, scale_factor=2, mode="nearest"), cfg.out / "samples.png", nrow=8)
    (cfg.out / "samples.txt").write_text("\n".join(prompts[:64]) + "\n")
    save(unet, cfg.out / "unet")
    scheduler.save_pretrained(cfg.out / "scheduler")
    return figures, seconds


def train_segmenter(cfg: TrainConfig, device: torch.device, tokens: TokenCache) -> tuple:
    segmenter = models.segmenter().to(device).train()
    rng = np.random.default_rng(cfg.seed + 6)

    def loss_fn(batch: Batch) -> torch.Tensor:
        phrases, target = segmentation_prompts(batch.scenes, rng, batch.masks)
        with autocast(device):
            logits = segmenter(input_ids=tokens(phrases, device), pixel_values=batch.images).logits
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    data = batches(cfg.segmenter.batch_size, cfg.seed + 7, device)
    seconds = optimise("segmenter", segmenter.parameters(), cfg.segmenter, cfg.steps_scale, data, loss_fn)
    segmenter.eval()
    figures = evaluate.segmenter_iou(segmenter, tokens, cfg.eval_size, cfg.seed + 104, device)
    save(segmenter, cfg.out / "segmenter")
    save_processor(models.segmenter_processor(), cfg.out / "segmenter")
    return figures, seconds


def train_captioner(cfg: TrainConfig, device: torch.device) -> tuple:
    captioner = models.captioner().to(device).train()
    processor = models.captioner_processor()
    words = processor.tokenizer

    def loss_fn(batch: Batch) -> torch.Tensor:
        ids = words(batch.captions, padding="longest", return_tensors="pt").input_ids.to(device)
        ids[:, 0] = captioner.config.text_config.bos_token_id   # BLIP starts captions with [DEC], not [CLS]
        labels = ids.masked_fill(ids == words.pad_token_id, -100)
        with autocast(device):
            return captioner(pixel_values=batch.images, input_ids=ids, labels=labels).loss

    data = batches(cfg.captioner.batch_size, cfg.seed + 8, device)
    seconds = optimise("captioner", captioner.parameters(), cfg.captioner, cfg.steps_scale, data, loss_fn)
    captioner.eval()
    figures = evaluate.captioner_exact_match(captioner, processor, cfg.eval_size, cfg.seed + 105, device)
    save(captioner, cfg.out / "captioner")
    save_processor(processor, cfg.out / "captioner")
    return figures, seconds


def train_world(cfg: TrainConfig) -> dict:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    tokens = TokenCache(models.text_tokenizer())
    figures, seconds = {}, {}
    start = time.time()
    clip, text_encoder, figures["clip"], seconds["clip"] = train_clip(cfg, device, tokens)
    print("clip:", figures["clip"], flush=True)
    clip.eval().requires_grad_(False)
    vae, figures["vae"], seconds["vae"] = train_vae(cfg, device)
    print("vae:", figures["vae"], flush=True)
    figures["unet"], seconds["unet"] = train_unet(cfg, device, tokens, vae, text_encoder, clip)
    print("unet:", figures["unet"], flush=True)
    figures["segmenter"], seconds["segmenter"] = train_segmenter(cfg, device, tokens)
    print("segmenter:", figures["segmenter"], flush=True)
    figures["captioner"], seconds["captioner"] = train_captioner(cfg, device)
    print("captioner:", figures["captioner"], flush=True)
    summary = {
        "command": "python -m toyworld.train " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(time.time() - start, 1)},
        "figures": figures,
        "versions": {"torch": torch.__version__},
    }
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="gpu", choices=["gpu", "cpu"], help="step counts and batch sizes")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (smoke runs)")
    args = parser.parse_args(argv)
    summary = train_world(preset(args.preset, out=args.out, device=args.device, seed=args.seed, steps_scale=args.steps_scale))
    print(json.dumps(summary["figures"], indent=2))


if __name__ == "__main__":
    main()
