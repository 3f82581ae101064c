"""DDIM inversion at guidance 1 (`editor.inversion=ddim`), with pix2pix-zero's autocorrelation regularizer (METHOD.md section 2).

The regularizer pushes each step's predicted noise `e` toward white Gaussian noise with gradient steps on
`e` alone (no UNet calls). Every random shift comes from the sample's own generator, so a sample inverts
the same way alone or in a batch, and a run is reproducible.

It takes 5 x (5 + 1) gradient steps per inversion step, each over a 4-level pyramid of small maps: with
autograd and the shifts drawn as needed, ~4,200 small ops and 100 host-to-device copies (on a GPU each a
stream synchronisation) per step, more launches than the UNet forward it follows. So the shifts of a whole
call are drawn up front and copied once without waiting, and the gradients are written out
(`autocorrelation_grad`, `kl_grad`; tested against autograd of the losses): 1,557 ops, no synchronisation
(BENCHMARKS.md, "The inversion's noise regularizer").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datagen.backbone import Backbone, timesteps_for
from datagen.inversions import Inversion, Inverter

MIN_PYRAMID_SIZE = 8


def pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Map shapes of the autocorrelation pyramid: the maps, then 2x2-average-pooled until 8 or less wide."""
    shapes = [(height, width)]
    while shapes[-1][1] > MIN_PYRAMID_SIZE:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    return shapes


def draw_shifts(generators: list[torch.Generator], channels: int, width: int, rounds: int) -> torch.Tensor:
    """Random offsets d in [1, w/2) per round, pyramid level of width w, sample and channel (rounds x levels x
    B x C, on the CPU), each sample's from its own generator in the order the rounds consume them."""
    widths = [w for _, w in pyramid_shapes(width, width)]
    draws = [torch.randint(1, max(w // 2, 2), (channels,), generator=g) for _ in range(rounds) for w in widths for g in generators]
    return torch.stack(draws).view(rounds, len(widths), len(generators), channels)


@dataclass
class PyramidRolls:
    """Gather indices that roll each (sample, channel) map of every pyramid level by its own offset d, ahead (+d)
    and back (-d), along H (dim 2) and W (dim 3): `index[level][dim][back]`, B x C x h x 1 or B x C x 1 x w.
    Made once for all rounds of a regularizer call (leading dim R), then taken round by round."""

    index: list[dict[int, tuple[torch.Tensor, torch.Tensor]]]

    @classmethod
    def of(cls, shifts: torch.Tensor, height: int, width: int) -> "PyramidRolls":
        """From offsets ([R x] levels x B x C, as `draw_shifts` gives them) for maps of height x width."""
        def index(level_shifts: torch.Tensor, size: int, dim: int) -> torch.Tensor:
            rows = (torch.arange(size, device=level_shifts.device) - level_shifts.unsqueeze(-1)) % size
            return rows.unsqueeze(-1 if dim == 2 else -2)

        levels = shifts.unbind(-3)
        return cls([{dim: (index(d, size, dim), index(-d, size, dim)) for dim, size in ((2, h), (3, w))}
                    for d, (h, w) in zip(levels, pyramid_shapes(height, width))])

    def __getitem__(self, round_: int) -> "PyramidRolls":
        return PyramidRolls([{dim: (ahead[round_], back[round_]) for dim, (ahead, back) in level.items()}
                             for level in self.index])

    def roll(self, x: torch.Tensor, level: int, dim: int, back: bool = False) -> torch.Tensor:
        return torch.gather(x, dim, self.index[level][dim][back].expand_as(x))


def autocorrelation_loss(noise: torch.Tensor, rolls: PyramidRolls) -> torch.Tensor:
    """Sum over samples, channels and pyramid levels (H, H/2, ... down to 8) of the squared autocorrelation
    at one offset d per map (`rolls`) along H and along W (the same d for both, as in the official code).

    No x2 rescale after pooling (the code's choice; the paper's x2 only scales the loss)."""
    loss, level = noise.new_zeros(()), noise
    for i in range(len(rolls.index)):
        if i:
            level = F.avg_pool2d(level, kernel_size=2)
        for dim in (2, 3):
            correlation = (level * rolls.roll(level, i, dim)).mean(dim=(2, 3))  # B x C
            loss = loss + correlation.pow(2).sum()
    return loss


def autocorrelation_grad(noise: torch.Tensor, rolls: PyramidRolls) -> torch.Tensor:
    """d autocorrelation_loss / d noise. Per level y and direction, d(c^2)/dy = 2c (roll(y, d) + roll(y, -d)) / hw
    with c = mean(y roll(y, d)); a level's gradient reaches the maps through average pooling's adjoint (each value
    spread over its 2x2 block, / 4 per level: folded into the level's factor; zero where pooling dropped a row)."""
    levels = [noise]
    while len(levels) < len(rolls.index):
        levels.append(F.avg_pool2d(levels[-1], kernel_size=2))
    grad = torch.zeros_like(levels[-1])
    for i in reversed(range(len(levels))):
        level = levels[i]
        if i < len(levels) - 1:
            grad = F.interpolate(grad, scale_factor=2.0, mode="nearest")
            if grad.shape != level.shape:
                grad = F.pad(grad, (0, level.shape[3] - grad.shape[3], 0, level.shape[2] - grad.shape[2]))
        factor = 2 / (level.shape[2] * level.shape[3] * 4**i)
        for dim in (2, 3):
            ahead, back = rolls.roll(level, i, dim), rolls.roll(level, i, dim, back=True)
            correlation = (level * ahead).mean(dim=(2, 3), keepdim=True)  # B x C x 1 x 1
            grad = torch.addcmul(grad, correlation, ahead + back, value=factor)
    return grad


def kl_loss(noise: torch.Tensor) -> torch.Tensor:
    """Per sample, KL(N(mean, var) || N(0, 1)) up to constants, summed over the batch."""
    flat = noise.flatten(1)
    var, mean = flat.var(dim=1), flat.mean(dim=1)
    return (var + mean.pow(2) - 1 - torch.log(var + 1e-7)).sum()


def kl_grad(noise: torch.Tensor) -> torch.Tensor:
    """d kl_loss / d noise: var (unbiased) moves each value by 2(x - mean) / (N - 1), mean^2 by 2 mean / N."""
    flat = noise.flatten(1)
    n, var, mean = flat.shape[1], flat.var(dim=1, keepdim=True), flat.mean(dim=1, keepdim=True)
    grad = (1 - 1 / (var + 1e-7)) * 2 * (flat - mean) / (n - 1) + 2 * mean / n
    return grad.view_as(noise)


@dataclass
class NoiseRegularizer:
    """`num_reg_steps` x (`num_ac_rolls` autocorrelation steps of size lambda_ac / rolls, one KL step)."""

    lambda_ac: float = 20.0
    lambda_kl: float = 20.0
    num_reg_steps: int = 5
    num_ac_rolls: int = 5

    def __call__(self, noise: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        e = noise.detach().float()
        rolls = self.num_ac_rolls if self.lambda_ac > 0 else 0
        if rolls:
            shifts = draw_shifts(generators, e.shape[1], e.shape[-1], self.num_reg_steps * rolls)
            if e.device.type == "cuda":  # a pageable copy would wait for the UNet forward still running
                shifts = shifts.pin_memory().to(e.device, non_blocking=True)
            pyramid = PyramidRolls.of(shifts, e.shape[2], e.shape[3])
        for step in range(self.num_reg_steps):
            for roll in range(rolls):
                e = e - self.lambda_ac / rolls * self.autocorrelation_grad(e, pyramid[step * rolls + roll])
            if self.lambda_kl > 0:
                e = e - self.lambda_kl * self.kl_grad(e)
        return e.to(noise.dtype)

    def autocorrelation_grad(self, noise: torch.Tensor, rolls: PyramidRolls) -> torch.Tensor:
        return autocorrelation_grad(noise, rolls)

    def kl_grad(self, noise: torch.Tensor) -> torch.Tensor:
        return kl_grad(noise)


@torch.no_grad()
def ddim_trajectory(backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, num_steps: int,
                    regularizer: NoiseRegularizer | None, generators: list[torch.Generator]) -> list[torch.Tensor]:
    """x_0 latents -> [x_0, ..., x_T] by DDIM inversion without classifier-free guidance (the official code's choice).

    Walks the same `num_steps` timesteps the DDIM sampler walks back, so sampling from x_T with the same steps
    and no guidance reconstructs `latents` up to the eps(x_t) ~ eps(x_{t-1}) approximation; entry N - 1 - i is
    where sampling step i should land."""
    scheduler = backbone.inverse_scheduler
    x = latents.float()  # the trajectory stays in fp32; only the UNet runs in the backbone's precision
    trajectory = [x]
    for t, t_device in timesteps_for(scheduler, num_steps, latents.device):
        eps = backbone.unet(x.to(backbone.dtype), t_device, encoder_hidden_states=cond).sample.float()
        if regularizer is not None:
            eps = regularizer(eps, generators)
        x = scheduler.step(eps, t, x).prev_sample
        trajectory.append(x)
    return trajectory


def ddim_invert(backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, num_steps: int,
                regularizer: NoiseRegularizer | None, generators: list[torch.Generator]) -> torch.Tensor:
    """x_0 latents -> x_T (the end of `ddim_trajectory`)."""
    return ddim_trajectory(backbone, latents, cond, num_steps, regularizer, generators)[-1]


class DDIMInversion(Inverter):
    name = "ddim"

    def __init__(self, regularizer: NoiseRegularizer | None = None) -> None:
        self.regularizer = regularizer

    def __call__(self, backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 num_steps: int, guidance_scale: float, generators: list[torch.Generator]) -> Inversion:
        x_T = ddim_invert(backbone, latents, cond, num_steps, self.regularizer, generators)
        return Inversion(x_T, unet_evals=num_steps, records=[{"method": self.name} for _ in generators])
