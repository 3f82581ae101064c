"""Null-text inversion (Mokady et al., CVPR 2023; the official notebook's `NullInversion`, EDITORS.md section 2):
DDIM inversion at guidance 1 keeps z*_0..z*_N; then, sampling back from z*_N with guidance, each step's null
embedding is optimised with Adam until the guided step lands on the trajectory.

Batched: a sample's loss is its own mean, the batch's gradient their sum, so each sample gets the gradient it gets
alone; Adam is elementwise, so one optimiser over B x 77 x D is B independent ones, except that each sample stops
on its own loss: the rows of a stopped sample are put back after every later optimiser step, and its rows leave
the UNet's batch."""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from datagen.backbone import Backbone, timesteps_for
from datagen.inversions.ddim import ddim_trajectory
from datagen.inversions import Inversion, Inverter


class NullTextInversion(Inverter):
    """Up to `inner_steps` Adam steps per sampling step i, at lr * (1 - i / 100), warm-started from step i - 1's
    embedding (step 0 from `uncond`); a sample stops after the update whose pre-update loss is below
    `early_stop[0] + early_stop[1] * i`, so it always takes at least one."""

    name = "null_text"

    def __init__(self, inner_steps: int = 10, lr: float = 0.01, early_stop: Sequence[float] = (1e-5, 2e-5)) -> None:
        self.inner_steps, self.lr = inner_steps, lr
        self.early_stop = tuple(early_stop)

    def __call__(self, backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 num_steps: int, guidance_scale: float, generators: list[torch.Generator]) -> Inversion:
        start, batch = time.perf_counter(), latents.shape[0]
        trajectory = ddim_trajectory(backbone, latents, cond, num_steps, None, generators)  # z*_0..z*_N, B x C x h x w

        def unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            context = context.to(backbone.dtype)
            return backbone.unet(x.to(backbone.dtype), t, encoder_hidden_states=context).sample.float()

        def guided_step(eps_u: torch.Tensor, eps_c: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return backbone.scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample

        # fp32 master copy: Adam's steps (lr 1e-2 and down) would round away in a bf16 embedding
        null = uncond.detach().float().clone().requires_grad_(True)  # B x 77 x D
        nulls: list[torch.Tensor] = []  # per step, B x 77 x D
        inner_steps = [[0] * num_steps for _ in range(batch)]  # [sample][step]
        final_loss: list[list[float | None]] = [[None] * num_steps for _ in range(batch)]
        z = trajectory[-1]  # z_bar, where guided sampling with the embeddings so far has got to
        for i, (t, t_device) in enumerate(timesteps_for(backbone.scheduler, num_steps, latents.device)):
            target, threshold = trajectory[num_steps - 1 - i], self.early_stop[0] + self.early_stop[1] * i
            with torch.no_grad():
                eps_c = unet(z, t_device, cond)
            optimizer = torch.optim.Adam([null], lr=self.lr * (1 - i / 100))
            active = list(range(batch))  # samples still optimising this step
            for _ in range(self.inner_steps):
                rows = torch.tensor(active, device=z.device)
                with torch.enable_grad():  # the editor may call us under no_grad
                    eps_u = unet(z[rows], t_device, null[rows])
                    landed = guided_step(eps_u, eps_c[rows], t, z[rows])
                    loss = (landed - target[rows]).square().flatten(1).mean(1)  # (A,) per active sample
                    # the embedding's gradient only: nothing accumulates on the UNet, whatever its requires_grad
                    (null.grad,) = torch.autograd.grad(loss.sum(), null)
                stopped = [b for b in range(batch) if b not in active]
                kept = null.detach()[stopped]  # a copy: advanced indexing
                optimizer.step()
                with torch.no_grad():
                    null[stopped] = kept
                losses = loss.tolist()  # the host decides who stops: one read per inner step
                for b, value in zip(active, losses):
                    inner_steps[b][i], final_loss[b][i] = inner_steps[b][i] + 1, float(f"{value:.4g}")
                active = [b for b, value in zip(active, losses) if value >= threshold]
                if not active:
                    break
            nulls.append(null.detach().to(uncond.dtype).clone())
            with torch.no_grad():
                z = guided_step(unet(z, t_device, nulls[-1]), eps_c, t, z)

        seconds = (time.perf_counter() - start) / batch
        # per sample: inversion, then per step eps_c, its inner steps' eps_u and the final eps_u (eps_c reused)
        evals = [num_steps + sum(2 + k for k in steps) for steps in inner_steps]
        records = [{"method": self.name, "inner_steps": steps, "final_loss": losses, "unet_evals": count,
                    "seconds": round(seconds, 4)} for steps, losses, count in zip(inner_steps, final_loss, evals)]
        return Inversion(trajectory[-1], uncond=nulls, unet_evals=round(sum(evals) / batch), records=records)
