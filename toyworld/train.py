"""Train the whole toy world from scratch: `python -m toyworld.train [--device cuda] [--out toyworld/weights]`.

Stages run in order, each saving its model with `save_pretrained` (fp16 safetensors) into the layout
the engine loads as `model=toy`: clip/ (then text_encoder/, its text tower, and tokenizer/), vae/,
unet/ + scheduler/, segmenter/, captioner/. Every batch is rendered fresh from the seed, so the same
command and seed remake the same world (up to the device's float order). `summary.json` records the
command, device, seed, time and validation figures of each stage.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image
from transformers import CLIPModel

from datagen.runtime import resolve_device
from toyworld import evaluate, models
from toyworld.models import WEIGHTS
from toyworld.data import Batch, TokenCache, batches, segmentation_prompts
from toyworld.world import SHAPES

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
    clip_vision: Stage = field(default_factory=lambda: Stage(1500, 512, 1e-3))
    vae: Stage = field(default_factory=lambda: Stage(3000, 256, 1e-3))
    vae_decoder: Stage = field(default_factory=lambda: Stage(400, 256, 1e-3))
    unet: Stage = field(default_factory=lambda: Stage(3500, 512, 1e-3))
    segmenter: Stage = field(default_factory=lambda: Stage(800, 256, 1e-3))
    captioner: Stage = field(default_factory=lambda: Stage(800, 256, 1e-3))
    caption_dropout: float = 0.1   # empty prompts, so classifier-free guidance works
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.3   # `training_noise`: without it samples from pure noise match their caption half as often
    continue_unet: bool = False   # start from the UNet in `out` (a fine-tune) instead of a fresh one
    eval_size: int = 512
    eval_diffusion_size: int = 128


def preset(name: str, **overrides) -> TrainConfig:
    """"gpu": batches and steps for one H100, ~15 minutes: vae 3000 x 256 at 22 steps/s, unet 3500 x 512 at 7.1
    steps/s (8.2 min), vae_decoder 400 x 256 at 26 steps/s (measured, BENCHMARKS.md). "cpu": for this 2-core
    CPU with `--side-by-side`, ~90 minutes: clip (10 min) | vae (16), then unet (3000 x 64 at 0.7 steps/s on
    one thread, 72 min) | clip_vision (24), segmenter (15), captioner (19)."""
    if name == "cpu":
        overrides = dict(clip=Stage(800, 128, 2e-3), clip_vision=Stage(3000, 128, 1e-3), vae=Stage(500, 64, 2e-3), vae_decoder=Stage(400, 64, 1e-3),
                         unet=Stage(3000, 64, 1e-3), segmenter=Stage(3000, 64, 2e-3), captioner=Stage(5000, 64, 2e-3),
                         eval_size=256, eval_diffusion_size=64) | overrides
    return TrainConfig(**overrides)


class Progress:
    def __init__(self, name: str, steps: int) -> None:
        self.name, self.steps, self.start = name, steps, time.time()

    def __call__(self, step: int, loss: torch.Tensor) -> None:
        if step % max(1, self.steps // 10) == 0 or step == self.steps:
            rate = step / max(time.time() - self.start, 1e-9)
            print(f"[{self.name}] step {step}/{self.steps} loss {loss.item():.4f} ({rate:.1f} steps/s)", flush=True)


@dataclass
class Spent:
    seconds: float
    steps: int


class StopOnTerm:
    """SIGTERM (`timeout`, a cluster's pre-emption warning) ends a stage after its current step; the stage
    then evaluates and saves what it has, and summary.json records the steps actually taken."""

    def __enter__(self) -> StopOnTerm:
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self.request)
        return self

    def request(self, *_) -> None:
        self.requested = True

    def __exit__(self, *_) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def optimise(name: str, params, stage: Stage, scale: float, data, loss_fn, ema: EMAModel | None = None) -> Spent:
    """AdamW, 5% warm-up then cosine decay over `stage.steps * scale` steps (fewer if SIGTERM comes)."""
    steps = max(1, round(stage.steps * scale))
    params = [p for p in params if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, stage.lr, total_steps=steps, pct_start=0.05)
    progress = Progress(name, steps)
    with StopOnTerm() as stop:
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
            if stop.requested:
                print(f"[{name}] SIGTERM: stopping after step {step}/{steps}", flush=True)
                break
    return Spent(time.time() - progress.start, step)


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


def shape_labels(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The shape each image shows (single-object scenes; -100 elsewhere) and the shape each caption names
    first (-100 where it says "shape" instead)."""
    image = np.where(batch.scenes.present[:, 1], -100, batch.scenes.shape[:, 0])
    text = [next((SHAPES.index(w) for w in caption.split() if w in SHAPES), -100) for caption in batch.captions]
    return torch.as_tensor(image), torch.as_tensor(text)


def shape_probes(clip: CLIPModel) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({side: torch.nn.Linear(clip.config.projection_dim, len(SHAPES))
                                for side in ("image", "text")}).to(clip.device)


def clip_loss(clip: CLIPModel, probes: torch.nn.ModuleDict, tokens: TokenCache, device: torch.device):
    """Contrastive, plus a linear shape probe on each tower's embedding (the probes are dropped after training).

    Without the probes the towers settle in a shape-blind optimum: colour is learnt within a hundred steps,
    and while the small ViT cannot yet tell a circle from a square, the text tower is rewarded for giving
    "red circle" and "red square" the same embedding (measured: cosine 1.000, shape accuracy at chance)."""

    def loss_fn(batch: Batch) -> torch.Tensor:
        # Equal captions are all positives (partial captions like "a circle" repeat within a batch).
        ids = torch.as_tensor(np.unique(batch.captions, return_inverse=True)[1], device=device)
        same = (ids[:, None] == ids[None, :]).float()
        image_shape, text_shape = (labels.to(device) for labels in shape_labels(batch))
        with autocast(device):
            out = clip(input_ids=tokens(batch.captions, device), pixel_values=batch.images)
        target = same / same.sum(1, keepdim=True)
        logits = out.logits_per_text.float()
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        probe = (F.cross_entropy(probes["image"](out.image_embeds.float()), image_shape)
                 + F.cross_entropy(probes["text"](out.text_embeds.float()), text_shape))
        return contrastive + probe

    return loss_fn


def train_clip(cfg: TrainConfig, device: torch.device, tokens: TokenCache) -> tuple:
    """Both towers; the text tower is saved as the UNet's text encoder and never changes afterwards."""
    clip = models.clip_model().to(device).train()
    probes = shape_probes(clip)
    data = batches(cfg.clip.batch_size, cfg.seed + 1, device, partial_prob=0.5, twins=True)
    spent = optimise("clip", [*clip.parameters(), *probes.parameters()], cfg.clip, cfg.steps_scale, data,
                       clip_loss(clip, probes, tokens, device))
    clip.eval()
    figures = evaluate.clip_zero_shot(clip, tokens, cfg.eval_size, cfg.seed + 101, device)
    save(clip, cfg.out / "clip")
    save_processor(models.clip_processor(), cfg.out / "clip")
    save(clip.text_model, cfg.out / "text_encoder")  # a CLIPTextModel: SD's text encoder class
    save_processor(models.text_tokenizer(), cfg.out / "tokenizer")
    return clip, clip.text_model, figures, spent


def train_clip_vision(cfg: TrainConfig, device: torch.device, tokens: TokenCache, clip: CLIPModel) -> tuple:
    """The vision side goes on learning against the frozen text tower (the UNet's text encoder, so the two
    stay one model). A small ViT learns shapes slowly (a supervised probe alone: 44% after 300 steps x 128
    on the CPU), far slower than colours; the UNet needs the text tower only, so this stage may also run beside the UNet's (`--stages`)."""
    clip.train().requires_grad_(True)
    clip.text_model.requires_grad_(False)
    probes = shape_probes(clip)
    data = batches(cfg.clip_vision.batch_size, cfg.seed + 9, device, partial_prob=0.5, twins=True)
    spent = optimise("clip_vision", [*clip.parameters(), *probes.parameters()], cfg.clip_vision, cfg.steps_scale,
                       data, clip_loss(clip, probes, tokens, device))
    clip.eval().requires_grad_(False)
    figures = evaluate.clip_zero_shot(clip, tokens, cfg.eval_size, cfg.seed + 106, device)
    save(clip, cfg.out / "clip")
    return figures, spent


def reconstruction_loss(vae: AutoencoderKL, device: torch.device, kl_weight: float):
    def loss_fn(batch: Batch) -> torch.Tensor:
        with autocast(device):
            posterior = vae.encode(batch.images).latent_dist
            decoded = vae.decode(posterior.sample()).sample.float()
        return F.l1_loss(decoded, batch.images) + F.mse_loss(decoded, batch.images) + kl_weight * posterior.kl().mean()

    return loss_fn


def train_vae(cfg: TrainConfig, device: torch.device) -> tuple:
    vae = models.autoencoder().to(device).train()
    # kl_weight as SD's autoencoder: latents stay nearly deterministic, scaled afterwards.
    data = batches(cfg.vae.batch_size, cfg.seed + 2, device)
    spent = optimise("vae", vae.parameters(), cfg.vae, cfg.steps_scale, data, reconstruction_loss(vae, device, 1e-6))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(next(batches(1024, cfg.seed + 3, device)).images).latent_dist.sample()
    # SD's rule: scale latents to unit variance for the diffusion model (SD 1.x: 0.18215).
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    figures = evaluate.vae_psnr(vae, cfg.eval_size, cfg.seed + 102, device)
    figures["vae_scaling_factor"] = vae.config.scaling_factor
    save(vae, cfg.out / "vae")
    return vae, figures, spent


def train_vae_decoder(cfg: TrainConfig, device: torch.device, tokens: TokenCache, vae: AutoencoderKL, clip) -> tuple:
    """The decoder alone, the encoder frozen (as stabilityai/sd-vae-ft-mse did for SD): the latent space, and so a
    UNet trained on it, stays valid. The CPU preset's short VAE stage blurs colours (the CLIP named the colour of
    0.65 of its reconstructions, 0.98 of the originals); the latents still hold them, the decoder learns them here."""
    vae.train().requires_grad_(False)
    for part in (vae.decoder, vae.post_quant_conv):
        part.requires_grad_(True)
    data = batches(cfg.vae_decoder.batch_size, cfg.seed + 10, device)
    spent = optimise("vae_decoder", vae.parameters(), cfg.vae_decoder, cfg.steps_scale, data,
                       reconstruction_loss(vae, device, 0.0))
    vae.eval().requires_grad_(False)
    figures = {**evaluate.vae_psnr(vae, cfg.eval_size, cfg.seed + 102, device),
               **evaluate.vae_colour_acc(vae, clip, tokens, cfg.eval_size, cfg.seed + 107, device)}
    save(vae, cfg.out / "vae")
    return figures, spent


def training_noise(latents: torch.Tensor, offset: float) -> torch.Tensor:
    """Gaussian noise like `latents` (N x C x H x W) plus `offset` times one N(0, 1) constant per image and channel.

    At 16 x 16 an image's mean per channel (its background's tone and colour) is 16 times easier to read in x_T
    than its pixels, and SD's schedule keeps 0.076 of the signal at t = 981: without the offset the UNet learns to
    take the mean from x_T, and from pure noise at sampling it reads a random one (toyworld/README.md)."""
    return torch.randn_like(latents) + offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)


def train_unet(cfg: TrainConfig, device: torch.device, tokens: TokenCache, vae, text_encoder, clip) -> tuple:
    unet = models.unet().to(device).train()
    if cfg.continue_unet:   # the weights only: the saved config (and its path) is the code's own
        unet.load_state_dict(load_stage(UNet2DConditionModel, cfg.out / "unet", device).state_dict())
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
        noise = training_noise(latents, cfg.noise_offset)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents.float() + (1 - a).sqrt() * noise
        with autocast(device):
            prediction = unet(noisy, t, context.float()).sample
        # Min-SNR-5 weighting (Hang et al. 2023): the nearly clean timesteps stop dominating the gradient, so
        # the coarse layout (which shape, which colour, where) is learnt in fewer steps.
        snr = a / (1 - a)
        weight = snr.clamp(max=cfg.min_snr_gamma) / snr
        return (weight * (prediction.float() - noise).pow(2)).mean()

    data = batches(cfg.unet.batch_size, cfg.seed + 5, device, partial_prob=0.3)
    spent = optimise("unet", unet.parameters(), cfg.unet, cfg.steps_scale, data, loss_fn, ema=ema)
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
    return figures, spent


def train_segmenter(cfg: TrainConfig, device: torch.device, tokens: TokenCache) -> tuple:
    segmenter = models.segmenter().to(device).train()
    rng = np.random.default_rng(cfg.seed + 6)

    def loss_fn(batch: Batch) -> torch.Tensor:
        phrases, target = segmentation_prompts(batch.scenes, rng, batch.masks)
        with autocast(device):
            logits = segmenter(input_ids=tokens(phrases, device), pixel_values=batch.images).logits
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    data = batches(cfg.segmenter.batch_size, cfg.seed + 7, device)
    spent = optimise("segmenter", segmenter.parameters(), cfg.segmenter, cfg.steps_scale, data, loss_fn)
    segmenter.eval()
    figures = evaluate.segmenter_iou(segmenter, tokens, cfg.eval_size, cfg.seed + 104, device)
    save(segmenter, cfg.out / "segmenter")
    save_processor(models.segmenter_processor(), cfg.out / "segmenter")
    return figures, spent


def train_captioner(cfg: TrainConfig, device: torch.device) -> tuple:
    """Captioning loss, plus a linear probe for the shapes present on the vision encoder's class token (dropped
    after training): as in the CLIP, the small ViT learns colours and backgrounds long before shapes, and
    without it most wrong captions (0.21 exact after 5000 x 64 steps) name the wrong shape."""
    captioner = models.captioner().to(device).train()
    processor = models.captioner_processor()
    words = processor.tokenizer
    probe = torch.nn.Linear(captioner.config.vision_config.hidden_size, len(SHAPES)).to(device)

    def loss_fn(batch: Batch) -> torch.Tensor:
        ids = words(batch.captions, padding="longest", return_tensors="pt").input_ids.to(device)
        ids[:, 0] = captioner.config.text_config.bos_token_id   # BLIP starts captions with [DEC], not [CLS]
        labels = ids.masked_fill(ids == words.pad_token_id, -100)
        shown = batch.scenes.present[..., None] & (batch.scenes.shape[..., None] == np.arange(len(SHAPES)))
        with autocast(device):
            out = captioner(pixel_values=batch.images, input_ids=ids, labels=labels)
        shapes = torch.as_tensor(shown.any(1), dtype=torch.float32, device=device)
        return out.loss + F.binary_cross_entropy_with_logits(probe(out.image_embeds[:, 0].float()), shapes)

    data = batches(cfg.captioner.batch_size, cfg.seed + 8, device)
    spent = optimise("captioner", [*captioner.parameters(), *probe.parameters()], cfg.captioner, cfg.steps_scale,
                       data, loss_fn)
    captioner.eval()
    figures = evaluate.captioner_exact_match(captioner, processor, cfg.eval_size, cfg.seed + 105, device)
    save(captioner, cfg.out / "captioner")
    save_processor(processor, cfg.out / "captioner")
    return figures, spent


STAGES = ("clip", "clip_vision", "vae", "unet", "vae_decoder", "segmenter", "captioner")
# Side by side on a CPU: two processes of one thread each beat one of two threads (these small models' kernels
# do not scale to a second core), and only the UNet waits for others (the VAE and the CLIP's text tower).
PHASES = ((("clip",), ("vae",)), (("unet",), ("clip_vision", "vae_decoder", "segmenter", "captioner")))


def start_summary(out: Path, stages: tuple[str, ...]) -> None:
    """A run of every stage makes a new world: no entry of an older one may stay in out/summary.json."""
    if set(stages) == set(STAGES):
        (out / "summary.json").unlink(missing_ok=True)


def record_stage(out: Path, name: str, entry: dict, continued: bool = False) -> dict:
    """Add a stage's entry to out/summary.json under a lock (side-by-side stages finish in any order).

    A `continued` stage (the UNet with `--continue-unet`) keeps the earlier run's entry under "continues", and so
    does `clip_vision` run again, as it starts from the saved CLIP and goes on training."""
    with open(out / "summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary_file = out / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        record = summary.setdefault("stages", {})
        earlier, clip = record.get(name), record.get("clip", {})
        if earlier and (continued or name == "clip_vision" and earlier.get("finished", 0) > clip.get("finished", 0)):
            entry["continues"] = earlier
        record[name] = entry
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_side_by_side(args: argparse.Namespace, stages: tuple[str, ...]) -> dict:
    """Run `stages` as PHASES in child processes of one thread each (the `--side-by-side` flag).

    SIGTERM is passed on to the running stages, which save what they trained (StopOnTerm); no later phase starts,
    and `--stages` with the stages left out of summary.json goes on from there."""
    start_summary(args.out, stages)
    common = ["--out", str(args.out), "--device", args.device, "--seed", str(args.seed), "--preset", args.preset,
              "--steps-scale", str(args.steps_scale)]
    common += [word for override in args.stage for word in ("--stage", *override)]
    common += ["--continue-unet"] * args.continue_unet
    common += [] if args.noise_offset is None else ["--noise-offset", str(args.noise_offset)]
    children: list[subprocess.Popen] = []
    stopped = []

    def forward(signum: int, _frame) -> None:
        stopped.append(signum)
        for child in children:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for phase in PHASES:
            children.clear()
            for group in ([s for s in group if s in stages] for group in phase):
                if group and not stopped:
                    command = [sys.executable, "-m", "toyworld.train", *common, "--stages", *group]
                    children.append(subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}))
                    if stopped:  # the signal came while the child was starting
                        children[-1].send_signal(signal.SIGTERM)
            codes = [child.wait() for child in children]
            # a child stopped before its handler was installed dies of the signal: it had nothing to keep
            fine = (0, -signal.SIGTERM) if stopped else (0,)
            failed = [child.args for child, code in zip(children, codes) if code not in fine]
            if failed:
                raise SystemExit(f"toyworld.train: a stage process failed: {failed}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        print("toyworld.train: SIGTERM passed on; the stages that ran saved what they trained (summary.json), "
              "no later stage started", flush=True)
    summary_file = args.out / "summary.json"
    return json.loads(summary_file.read_text()) if summary_file.exists() else {"stages": {}}


def load_stage(cls, path: Path, device: torch.device):
    """A stage trained by an earlier run, as its consumer needs it (fp32, eval, frozen)."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: train its stage first (--stages {path.name})")
    return cls.from_pretrained(path, torch_dtype=torch.float32).to(device).eval().requires_grad_(False)


def train_world(cfg: TrainConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Train `stages` in order; stages left out are loaded from `cfg.out` where a later stage needs them, and
    keep their entry in summary.json, so one weak model can be retrained without remaking the world."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    start_summary(cfg.out, stages)
    summary: dict = {}
    tokens = TokenCache(models.text_tokenizer())
    clip = text_encoder = vae = None

    def done(name: str, figures: dict, spent: Spent) -> None:
        nonlocal summary
        print(f"{name}:", figures, flush=True)
        summary = record_stage(cfg.out, name, {
            "command": "python -m toyworld.train " + " ".join(sys.argv[1:]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "seed": cfg.seed, "steps": spent.steps,
            "batch_size": getattr(cfg, name).batch_size, "lr": getattr(cfg, name).lr,
            "seconds": round(spent.seconds, 1), "finished": time.time(), "figures": figures, "torch": torch.__version__,
            **({"noise_offset": cfg.noise_offset} if name == "unet" else {}),
        }, continued=name == "unet" and cfg.continue_unet)

    if "clip" in stages:
        clip, text_encoder, figures, spent = train_clip(cfg, device, tokens)
        clip.eval().requires_grad_(False)
        done("clip", figures, spent)
    elif {"unet", "clip_vision", "vae_decoder"} & set(stages):
        clip = load_stage(CLIPModel, cfg.out / "clip", device)
        text_encoder = clip.text_model
    if "clip_vision" in stages:
        done("clip_vision", *train_clip_vision(cfg, device, tokens, clip))
    if "vae" in stages:
        vae, figures, spent = train_vae(cfg, device)
        done("vae", figures, spent)
    elif {"unet", "vae_decoder"} & set(stages):
        vae = load_stage(AutoencoderKL, cfg.out / "vae", device)
    if "unet" in stages:
        done("unet", *train_unet(cfg, device, tokens, vae, text_encoder, clip))
    if "vae_decoder" in stages:
        done("vae_decoder", *train_vae_decoder(cfg, device, tokens, vae, clip))
    if "segmenter" in stages:
        done("segmenter", *train_segmenter(cfg, device, tokens))
    if "captioner" in stages:
        done("captioner", *train_captioner(cfg, device))
    return summary


def config(args: argparse.Namespace) -> TrainConfig:
    """The preset, with the command line's `--stage NAME STEPS BATCH LR` overrides."""
    stages = {}
    for name, steps, batch_size, lr in args.stage:
        if name not in STAGES:
            raise SystemExit(f"--stage {name}: not a stage (one of {', '.join(STAGES)})")
        stages[name] = Stage(int(steps), int(batch_size), float(lr))
    return preset(args.preset, out=args.out, device=args.device, seed=args.seed, steps_scale=args.steps_scale,
                  continue_unet=args.continue_unet, **({} if args.noise_offset is None else {"noise_offset": args.noise_offset}),
                  **stages)


def arguments() -> argparse.ArgumentParser:
    """The command line (bench/gpu.sh's commands are checked against it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="gpu", choices=["gpu", "cpu"], help="step counts and batch sizes")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (smoke runs)")
    parser.add_argument("--stage", nargs=4, action="append", default=[], metavar=("NAME", "STEPS", "BATCH", "LR"),
                        help="override one stage of the preset, e.g. --stage unet 2700 64 1e-3 (repeatable)")
    parser.add_argument("--noise-offset", type=float, default=None, help="the UNet's offset noise (default: the preset's)")
    parser.add_argument("--continue-unet", action="store_true",
                        help="fine-tune the UNet saved in --out instead of training one from scratch")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                        help="retrain these only; the others are loaded from --out")
    parser.add_argument("--side-by-side", action="store_true",
                        help="two one-thread processes: clip | vae, then unet | clip_vision, vae_decoder, segmenter, captioner")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    stages = tuple(s for s in STAGES if s in args.stages)
    cfg = config(args)  # a wrong --stage stops here, before any stage process starts
    summary = train_side_by_side(args, stages) if args.side_by_side else train_world(cfg, stages)
    print(json.dumps({name: stage["figures"] for name, stage in summary["stages"].items()}, indent=2))


if __name__ == "__main__":
    main()
