"""Distillation of teacher pairs into a Co-Mod-GAN generator: the LightningModule.

G maps the input image to the teacher's edited image under L1 + LPIPS(VGG), the paper's objective (offline,
LPIPS's form on another frozen trunk: `perceptual`, distill/perceptual.py), plus (when `adversarial_weight` > 0) the non-saturating loss of a conditional discriminator D(input,
image) with lazy R1 on real pairs (every r1_interval-th step, inside that step's D update). An exponential
moving average of G's weights, `G_ema`, is what validation, samples and export use.

One step is one Adam step for G and D together, their gradients taken at the same point (G's adversarial
term sees D frozen, D sees G's output detached), so Lightning's `global_step` counts batches. The gradients
come from two backward passes, G's losses and then D's (+ R1), as StyleGAN2's phases: same gradients as one
backward of the sum, but each graph is freed before the next is built, so peak memory is the larger phase
rather than their sum (comodgan_256, fp32: 1.17 instead of 2.16 GiB per image, BENCHMARKS.md). Under
DDP the first pass accumulates locally (`no_sync`) and the second all-reduces every gradient once; as each
pass reaches only G's or D's parameters, DDP runs with `find_unused_parameters` (conf/trainer/ddp.yaml).

Checkpoints (`torch.load(path, weights_only=True)` reads them; everything is tensors or plain containers):

    ckpt["state_dict"]["G_ema.<name>"]      EMA generator, the one to export (parameters and w_avg)
    ckpt["state_dict"]["G.<name>"]          trained generator;  ["D.<name>"] discriminator (if any)
    ckpt["hyper_parameters"]["generator"]   its config, {"_target_": "models.comodgan.Generator", ...}

    generator = hydra.utils.instantiate(ckpt["hyper_parameters"]["generator"])
    generator.load_state_dict({k.removeprefix("G_ema."): v for k, v in ckpt["state_dict"].items()
                               if k.startswith("G_ema.")})

LPIPS (and a perceptual network configured in its place) is fixed and left out of checkpoints.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.strategies import ParallelStrategy
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from torchvision.utils import make_grid, save_image

from distill.data import stable_seed
from distill.losses import build_lpips, discriminator_adversarial, generator_adversarial, psnr, r1_penalty


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; raised before any weight is updated with it."""


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradients into `module`'s parameters for graphs built inside the block."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class DistillModule(pl.LightningModule):
    """Co-Mod-GAN student trained on (input, teacher edit) pairs; see the module doc.

    `generator` and `discriminator` are configs (`_target_` + arguments), kept in the checkpoint so
    that an export can rebuild the network. `ema_half_life` is in images, as StyleGAN's ema_kimg.
    `perceptual` is a config of the network whose distance is the `lpips_weight` term (default: LPIPS(VGG), which
    validation's val/lpips always is; `distill.perceptual` holds one that needs no download). `lr_rampdown` is the
    last share of `trainer.max_steps` over which the lr falls to 0 (cosine; 0 = constant). `channels_last` keeps G,
    D, LPIPS and the batches in NHWC layout, the one tensor cores' convolutions use (same results; whether it is
    faster is what `bench.train --channels-last false true` shows).
    """

    def __init__(self, generator: dict, adversarial_weight: float, discriminator: dict | None = None,
                 l1_weight: float = 1.0, lpips_weight: float = 1.0, r1_gamma: float = 10.0,
                 r1_interval: int = 16, lr: float = 1e-3, betas: Sequence[float] = (0.0, 0.99), eps: float = 1e-8,
                 ema_half_life: float = 10_000.0, lpips_pretrained_vgg: bool = True, seed: int = 0,
                 num_samples: int = 8, channels_last: bool = False, perceptual: dict | None = None,
                 lr_rampdown: float = 0.0):
        super().__init__()
        if adversarial_weight > 0 and discriminator is None:
            raise ValueError(f"adversarial_weight={adversarial_weight} needs a discriminator config")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.G = instantiate(generator)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
        self.D = instantiate(discriminator) if adversarial_weight > 0 else None
        self.lpips = build_lpips(lpips_pretrained_vgg)
        # the training loss's network: LPIPS(VGG) itself, or a trunk that exists offline (distill/perceptual.py)
        self.perceptual = instantiate(perceptual) if perceptual is not None else self.lpips
        self.register_state_dict_post_hook(_drop_lpips)
        self.register_load_state_dict_post_hook(_allow_missing_lpips)
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("l1", "lpips", "psnr")})
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        hp = self.hparams
        # G and D at the same lr and betas. StyleGAN2 scales D's by r1_interval / (r1_interval + 1) because its
        # lazy R1 is an extra Adam step; here R1 joins D's loss in the batch's one step, so D takes no extra steps.
        # One parameter group each, as older checkpoints hold them: those still resume (with the lr they saved).
        groups = [{"params": list(module.parameters())} for module in (self.G, self.D) if module is not None]
        optimizer = torch.optim.Adam(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        if not hp.lr_rampdown:
            return optimizer
        # cosine from lr to 0 over the last `lr_rampdown` share of max_steps: a run needs a high lr to leave the
        # copy-the-input optimum, and small final steps to settle on sharp edges rather than hover around them
        total = self.trainer.max_steps
        start = total * (1 - hp.lr_rampdown)
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, step - start) / (total - start))))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return {name: value.contiguous(memory_format=self.memory_format)
                if isinstance(value, Tensor) and value.ndim == 4 else value for name, value in batch.items()}

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # z, dropout and noise drawn from (seed, step, rank): a resumed run draws what an unbroken one would
        torch.manual_seed(stable_seed(self.hparams.seed, self.global_step, self.global_rank))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        image, target = batch["input"], batch["target"]
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        # under DDP, G's gradients wait for D's pass: one all-reduce per step
        defer_sync = self.D is not None and isinstance(self.trainer.strategy, ParallelStrategy)
        with self.trainer.strategy.block_backward_sync() if defer_sync else nullcontext():
            output, losses = self.generator_phase(image, target)
        if self.D is not None:
            losses |= self.discriminator_phase(image, target, output.detach())
        self.check_finite(losses)
        optimizer.step()
        if (schedule := self.lr_schedulers()) is not None:  # manual optimization: Lightning leaves it to the step
            schedule.step()
        self.update_ema(images=image.shape[0] * self.trainer.world_size)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=False,
                      batch_size=image.shape[0])

    def generator_phase(self, image: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """G's losses, backpropagated into G (D frozen); returns G's output and the detached losses."""
        hp = self.hparams
        output = self.G(image)
        losses = {"l1": F.l1_loss(output, target)}
        total = hp.l1_weight * losses["l1"]
        if hp.lpips_weight > 0:  # VGG's backward dominates a small generator's step
            losses["lpips"] = self.perceptual(output, target).mean()
            total = total + hp.lpips_weight * losses["lpips"]
        if self.D is not None:
            with frozen(self.D):
                losses["g_adv"] = generator_adversarial(self.D(image, output))
            total = total + hp.adversarial_weight * losses["g_adv"]
        self.manual_backward(total)
        return output, {name: loss.detach() for name, loss in losses.items()}

    def discriminator_phase(self, image: Tensor, target: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """D's loss on the real pair and G's detached output, plus lazy R1, backpropagated into D."""
        hp = self.hparams
        losses = {"d_adv": discriminator_adversarial(self.D(image, target), self.D(image, fake))}
        total = losses["d_adv"]
        if self.global_step % hp.r1_interval == 0:
            losses["r1"] = r1_penalty(self.D, image, target)
            total = total + hp.r1_gamma / 2 * hp.r1_interval * losses["r1"]
        self.manual_backward(total)
        return {name: loss.detach() for name, loss in losses.items()}

    def check_finite(self, losses: dict[str, Tensor]) -> None:
        """Raise NonFiniteLossError on every rank if any rank's losses are NaN or infinite (one sync per step)."""
        finite = bool(torch.stack([loss.detach().float() for loss in losses.values()]).isfinite().all())
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        values = ", ".join(f"{name}={loss.item():.4g}" for name, loss in losses.items())
        where = values if not finite else "on another rank"
        checkpoints = [c.last_model_path or c.best_model_path for c in self.trainer.checkpoint_callbacks]
        last_good = next((path for path in checkpoints if path), self.trainer.ckpt_path)
        raise NonFiniteLossError(
            f"non-finite loss at step {self.global_step} ({where}); stopped before updating the weights. "
            + (f"Last good checkpoint: {last_good} (continue with resume={last_good}, e.g. with a lower "
               f"distill.lr or trainer.precision=32)." if last_good else "No checkpoint was written yet."))

    @torch.no_grad()
    def update_ema(self, images: int) -> None:
        decay = 0.5 ** (images / self.hparams.ema_half_life)
        for ema, param in zip(self.G_ema.parameters(), self.G.parameters()):
            ema.lerp_(param, 1.0 - decay)
        for ema, buffer in zip(self.G_ema.buffers(), self.G.buffers()):
            ema.copy_(buffer)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image, target = batch["input"], batch["target"]
        output = self.G_ema(image).float()
        target = target.float()
        self.val_metrics["l1"].update((output - target).abs().flatten(1).mean(1))
        self.val_metrics["lpips"].update(self.lpips(output, target).flatten())
        self.val_metrics["psnr"].update(psnr(output, target))
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric, on_epoch=True, batch_size=image.shape[0])
        if batch_idx == 0 and self.global_rank == 0 and not self.trainer.sanity_checking:
            self.log_samples(image, target, output)

    def log_samples(self, image: Tensor, target: Tensor, output: Tensor) -> None:
        """A grid with one row per pair: input | teacher | student, saved and sent to image-capable loggers."""
        n = min(self.hparams.num_samples, image.shape[0])
        rows = torch.stack([image[:n], target[:n], output[:n]], dim=1).flatten(0, 1).float()
        grid = make_grid(rows * 0.5 + 0.5, nrow=3, padding=2).clamp(0, 1)
        path = Path(self.trainer.default_root_dir) / "samples" / f"step-{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/samples", [grid], step=self.global_step, caption=["input | teacher | student"])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", grid, self.global_step)


FIXED_NETWORKS = ("lpips.", "perceptual.")  # frozen, rebuilt from their own files: left out of checkpoints


def _drop_lpips(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [key for key in state_dict if key.removeprefix(prefix).startswith(FIXED_NETWORKS)]:
        del state_dict[key]


def _allow_missing_lpips(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not key.startswith(FIXED_NETWORKS)]
