"""DDIM inversion with pix2pix-zero's autocorrelation regularization (METHOD.md section 2).

The regularizer pushes each step's predicted noise `e` toward white Gaussian noise with gradient steps on
`e` alone (no UNet calls). Every random shift comes from the sample's own generator, so a sample inverts
the same way alone or in a batch, and a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datagen.backbone import Backbone

MIN_PYRAMID_SIZE = 8


def _roll_rows(x: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """Circularly roll each (sample, channel) map of x (B x C x H x W) by its own shift along `dim`."""
    size = x.shape[dim]
    positions = torch.arange(size, device=x.device)
    view = [1, 1, 1, 1]
    view[dim] = size
    index = (positions.view(view) - shifts.view(*shifts.shape, 1, 1)) % size  # B x C x (H|1) x (1|W)
    return torch.gather(x, dim, index.expand_as(x))


def autocorrelation_loss(noise: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Sum over samples, channels and pyramid levels (H, H/2, ... down to 8) of the squared autocorrelation
    at one random offset d in [1, H/2) along H and along W (the same d for both, as in the official code).

    No x2 rescale after pooling (the code's choice; the paper's x2 only scales the loss)."""
    batch, channels = noise.shape[:2]
    loss = noise.new_zeros(())
    level = noise
    while True:
        half = level.shape[-1] // 2
        shifts = torch.stack([torch.randint(1, max(half, 2), (channels,), generator=g) for g in generators]).to(noise.device)
        for dim in (2, 3):
            correlation = (level * _roll_rows(level, shifts, dim)).mean(dim=(2, 3))  # B x C
            loss = loss + correlation.pow(2).sum()
        if level.shape[-1] <= MIN_PYRAMID_SIZE:
            return loss
        level = F.avg_pool2d(level, kernel_size=2)


def kl_loss(noise: torch.Tensor) -> torch.Tensor:
    """Per sample, KL(N(mean, var) || N(0, 1)) up to constants, summed over the batch."""
    flat = noise.flatten(1)
    var, mean = flat.var(dim=1), flat.mean(dim=1)
    return (var + mean.pow(2) - 1 - torch.log(var + 1e-7)).sum()


@dataclass
class NoiseRegularizer:
    """`num_reg_steps` x (`num_ac_rolls` autocorrelation steps of size lambda_ac / rolls, one KL step)."""

    lambda_ac: float = 20.0
    lambda_kl: float = 20.0
    num_reg_steps: int = 5
    num_ac_rolls: int = 5

    @torch.enable_grad()
    def __call__(self, noise: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        e = noise.detach().float()
        for _ in range(self.num_reg_steps):
            if self.lambda_ac > 0:
                for _ in range(self.num_ac_rolls):
                    var = e.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(autocorrelation_loss(var, generators), var)
                    e = e - self.lambda_ac / self.num_ac_rolls * grad
            if self.lambda_kl > 0:
                var = e.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl_loss(var), var)
                e = e - self.lambda_kl * grad
        return e.detach().to(noise.dtype)


@torch.no_grad()
def ddim_invert(backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, num_steps: int,
                regularizer: NoiseRegularizer | None, generators: list[torch.Generator]) -> torch.Tensor:
    """x_0 latents -> x_T by DDIM inversion without classifier-free guidance (the official code's choice).

    Walks the same `num_steps` timesteps the DDIM sampler walks back, so sampling from the result with the
    same steps and no guidance reconstructs `latents` up to the eps(x_t) ~ eps(x_{t-1}) approximation."""
    scheduler = backbone.inverse_scheduler
    scheduler.set_timesteps(num_steps, device=latents.device)
    x = latents.float()  # the trajectory stays in fp32; only the UNet runs in the backbone's precision
    for t in scheduler.timesteps:
        eps = backbone.unet(x.to(backbone.dtype), t, encoder_hidden_states=cond).sample.float()
        if regularizer is not None:
            eps = regularizer(eps, generators)
        x = scheduler.step(eps, t, x).prev_sample
    return x
