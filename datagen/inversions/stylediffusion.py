"""StyleDiffusion's inversion (Li et al., arXiv 2303.15649; STYLEDIFFUSION.md section 1; the official
`stylediffusion.py` by default, the paper's choices behind options).

DDIM inversion at guidance 1 keeps z^_0..z^_N and, at every call, the conditional cross-attention maps of the
supervised layers (SD: the five 16 x 16 ones). Then, sampling back from z^_N with guidance, step i optimises a
mapping network M_i (warm-started from M_{i-1}) from the image's CLIP tokens E(x) to the value input of every
conditional cross-attention layer, v = c * s_i + b_i with (s_i, b_i) = M_i(E(x)) (keys keep the text c), on

    L = mean((z'_i - z^_{N-1-i})^2) + attention_weight * sum over the supervised layers of mean((A - A^(i))^2)

with A^(i) the inversion's maps on the latent being denoised (z^_{N-i}; step 0 reuses the last call's). E(x) is
fixed, so M_i(E(x)) is a constant: the per-step (s_i, b_i) and x_T are all that editing needs.

Batched over images: every image has its own networks (parameters with a leading image dimension, one
batched matmul per layer), its own BatchNorm statistics (over its own width axis, the train-mode BatchNorm1d of
a batch of one) and its own Adam (elementwise; a new one per step, as the code builds it). A loss is the image's
own mean and the gradient is taken of their sum, so each image gets the gradient it gets alone; an image stops
on its own loss, after which its parameters are put back after every later optimiser step and its rows leave
the UNet's batch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from datagen.attention import AttentionControl, AttentionHook, MapRecorder, Site, ValueModulation, controlled_processors
from datagen.backbone import Backbone, timesteps_for
from datagen.editors.p2p import blend_side
from datagen.inversions import Inversion, Inverter
from datagen.inversions.ddim import ddim_trajectory

OUTPUTS = ("film", "value")
FIRST_STEP_MAPS = ("reuse", "extra_call")


def inner_step_counts(num_steps: int, inner_steps: int, decay: float) -> list[int]:
    """K_i = ceil(K exp(-decay i)) inner iterations at step i (the code's np.ceil(K exp(-0.1 linspace(0, N-1, N)));
    the paper's "K_t = e^{-t} K" is garbled): 100, 91, 82, ..., 6 at N = 30, 1015 in all."""
    return [math.ceil(inner_steps * math.exp(-decay * i)) for i in range(num_steps)]


class MappingNetworks(torch.nn.Module):
    """One mapping network per image, batched: tokens B x N x W (treated as Conv1d channels, N of them, along a
    length-W axis) -> Conv1d(N -> H, k=1) -> Conv1d(H -> H) -> BatchNorm1d(H) -> LeakyReLU(0.01) -> Conv1d(H -> H).

    `output="film"` (code): H = 2 x 77, the output split into scale s = O[:77] and shift b = O[77:] of the text
    embedding (v = c * s + b); 78,540 parameters per image at SD's sizes. `output="value"` (paper, Table 1):
    H = 77 and the output is the value input itself (s = 0, b = O).

    BatchNorm stays in train mode (the code never calls .eval()), so its statistics are each image's own over the
    width axis and its running buffers are never read: they are not kept. Initialisation: PyTorch's Conv1d
    default, U(+-1/sqrt(fan_in)) for weights and biases (code), or `init_std` N(0, init_std^2) weights and zero
    biases (paper), drawn from each image's own generator so an image starts alike alone or in a batch."""

    def __init__(self, generators: Sequence[torch.Generator], tokens: int, keys: int = 77, output: str = "film",
                 init_std: float | None = None) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
        self.keys, self.output = keys, output
        channels = 2 * keys if output == "film" else keys

        def conv(fan_out: int, fan_in: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
            weights, biases = [], []
            for g in generators:
                if init_std is None:
                    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) and Conv1d's bias rule
                    weights.append((torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound)
                    biases.append((torch.rand(fan_out, generator=g) * 2 - 1) * bound)
                else:
                    weights.append(torch.randn(fan_out, fan_in, generator=g) * init_std)
                    biases.append(torch.zeros(fan_out))
            return torch.nn.Parameter(torch.stack(weights)), torch.nn.Parameter(torch.stack(biases))

        self.w_in, self.b_in = conv(channels, tokens)  # B x H x N, B x H
        self.w_mid, self.b_mid = conv(channels, channels)
        self.w_out, self.b_out = conv(channels, channels)
        self.bn_weight = torch.nn.Parameter(torch.ones(len(generators), channels))
        self.bn_bias = torch.nn.Parameter(torch.zeros(len(generators), channels))

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens A x N x W of the images `rows` (A indices into the B networks) -> (scale, shift), A x 77 x W."""
        def conv(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.baddbmm(b[rows].unsqueeze(-1), w[rows], x)  # A x out x W

        h = conv(self.w_mid, self.b_mid, conv(self.w_in, self.b_in, tokens))
        mean, var = h.mean(2, keepdim=True), h.var(2, unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * self.bn_weight[rows].unsqueeze(-1) + self.bn_bias[rows].unsqueeze(-1)
        out = conv(self.w_out, self.b_out, F.leaky_relu(h, 0.01))
        if self.output == "film":
            return out[:, : self.keys], out[:, self.keys :]
        return torch.zeros_like(out), out


@dataclass(eq=False)
class MapHistory(AttentionHook):
    """Every call's maps at the layers `where` selects: `maps[layer][k]` is call k's, rows x heads x queries x keys."""

    where: Callable[[Site, int], bool]
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def reads(self, site: Site, queries: int) -> bool:
        return self.where(site, queries)

    def __call__(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        self.maps.setdefault(site.name, []).append(probs.detach().float())
        return probs


@dataclass(frozen=True)
class SupervisedLayers:
    """The down and up blocks' cross-attention layers whose query map is `side` x `side` (SD: 16 x 16 of 64 x 64
    latents, the code's down_cross[2:4] + up_cross[:3]; the mid block is left out)."""

    side: int

    def __call__(self, site: Site, queries: int) -> bool:
        return site.cross and site.place != "mid" and queries == self.side ** 2


class StyleDiffusionInversion(Inverter):
    """Options (defaults: the official code; paper in brackets):
    - `inner_steps`, `inner_decay`: K_i = ceil(inner_steps exp(-inner_decay i)) (100, 0.1).
    - `lr`, `lr_decay`: Adam's lr at step i is lr (1 - i / 100) (1e-2, true) [1e-4, false: constant];
      `betas` (0.9, 0.999) [(0, 0.999)].
    - `early_stop`: (a, b): an image stops after the update whose pre-update loss is below a + b i (1e-5, 2e-5);
      null: never [the paper has no early stop].
    - `attention_weight`: lambda_att (1; the code's --w_attnloss) [1]; 0: latent loss alone.
    - `attention_resolution`: the supervised layers' map side; null: the latent side / 4 snapped to one the UNet
      has (SD: 16).
    - `output`: "film", v = c * s + b (code) | "value", v = M(E(x)) [paper]; `init_std`: null, PyTorch's
      default init (code) [0.01].
    - `first_step_maps`: step 0's target maps: "reuse" the last inversion call's (code) | "extra_call", one more
      UNet call on z^_N at the first sampling timestep [paper].

    Called with `image_tokens` (B x N x D, E(x) with the text's width D): editor=stylediffusion computes them."""

    name = "stylediffusion"

    def __init__(self, inner_steps: int = 100, inner_decay: float = 0.1, lr: float = 0.01,
                 betas: Sequence[float] = (0.9, 0.999), early_stop: Sequence[float] | None = (1e-5, 2e-5),
                 lr_decay: bool = True, attention_weight: float = 1.0, attention_resolution: int | None = None,
                 output: str = "film", init_std: float | None = None, first_step_maps: str = "reuse") -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
        if first_step_maps not in FIRST_STEP_MAPS:
            raise ValueError(f"first_step_maps must be one of {', '.join(FIRST_STEP_MAPS)}, not {first_step_maps!r}")
        self.inner_steps, self.inner_decay, self.lr, self.lr_decay = inner_steps, inner_decay, lr, lr_decay
        self.betas = (float(betas[0]), float(betas[1]))
        self.early_stop = None if early_stop is None else (float(early_stop[0]), float(early_stop[1]))
        self.attention_weight, self.attention_resolution = attention_weight, attention_resolution
        self.output, self.init_std, self.first_step_maps = output, init_std, first_step_maps

    def step_lr(self, i: int) -> float:
        return self.lr * (1 - i / 100) if self.lr_decay else self.lr

    def __call__(self, backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 num_steps: int, guidance_scale: float, generators: list[torch.Generator],
                 image_tokens: torch.Tensor | None = None) -> Inversion:
        if image_tokens is None:
            raise ValueError("StyleDiffusion's inversion maps the image's CLIP tokens: use editor=stylediffusion")
        unet = backbone.unet
        previous = unet.attn_processors  # the caller's processors, put back at the end
        control, processors = controlled_processors(unet)
        unet.set_attn_processor(dict(processors))
        try:
            return self.invert(backbone, control, latents, cond, uncond, num_steps, guidance_scale, generators,
                               image_tokens.float())
        finally:
            unet.set_attn_processor(previous)

    def invert(self, backbone: Backbone, control: AttentionControl, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               num_steps: int, w: float, generators: list[torch.Generator], tokens: torch.Tensor) -> Inversion:
        start, batch, device = time.perf_counter(), latents.shape[0], latents.device
        if tokens.shape[-1] != cond.shape[-1]:
            raise ValueError(f"image tokens are {tokens.shape[-1]} wide and the text embedding {cond.shape[-1]}: "
                             "the value input c * s + b needs them alike")
        # the layers LocalBlend reads by the same rule (SD: the five 16 x 16 ones)
        supervised = SupervisedLayers(blend_side(backbone.unet, latents.shape[-1], self.attention_resolution))
        history = MapHistory(supervised)
        with control.using(history):
            trajectory = ddim_trajectory(backbone, latents, cond, num_steps, None, generators)  # z^_0..z^_N
        timesteps = timesteps_for(backbone.scheduler, num_steps, device)
        extra_calls = 0
        if self.first_step_maps == "extra_call":  # A_N: the maps on z^_N itself, its latent discarded
            with torch.no_grad(), control.using(history):
                backbone.unet(trajectory[-1].to(backbone.dtype), timesteps[0][1], encoder_hidden_states=cond)
            extra_calls = 1
        else:  # the code appends a copy of the last call's maps as A_N
            for maps in history.maps.values():
                maps.append(maps[-1])

        def unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return backbone.unet(x.to(backbone.dtype), t, encoder_hidden_states=context.to(backbone.dtype)).sample.float()

        def guided_step(eps_u: torch.Tensor, eps_c: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return backbone.scheduler.step(eps_u + w * (eps_c - eps_u), t, x).prev_sample

        networks = MappingNetworks(generators, tokens.shape[1], cond.shape[1], self.output, self.init_std).to(device)
        params = list(networks.parameters())
        modulation, recorder = ValueModulation(), MapRecorder(supervised, grad=True)
        every = torch.arange(batch, device=device)
        counts = inner_step_counts(num_steps, self.inner_steps, self.inner_decay)
        taken = [[0] * num_steps for _ in range(batch)]  # [image][step]
        losses: dict[str, list[list[float | None]]] = {
            key: [[None] * num_steps for _ in range(batch)] for key in ("first_loss", "final_loss", "rec_loss", "att_loss")}
        values: list[tuple[torch.Tensor, torch.Tensor]] = []
        z = trajectory[-1]  # z~, where guided sampling with the networks so far has got to
        for i, (t, t_device) in enumerate(timesteps):
            target = trajectory[num_steps - 1 - i]
            target_maps = {name: maps[num_steps - i] for name, maps in history.maps.items()}  # A^(i) = A_{N-i}
            threshold = None if self.early_stop is None else self.early_stop[0] + self.early_stop[1] * i
            with torch.no_grad():
                eps_u = unet(z, t_device, uncond)
            optimizer = torch.optim.Adam(params, lr=self.step_lr(i), betas=self.betas)  # M_i warm-starts from M_{i-1}
            active = list(range(batch))
            for _ in range(counts[i]):
                rows = torch.tensor(active, device=device)
                with torch.enable_grad():  # the editor may call us under no_grad
                    modulation.scale, modulation.shift = networks(tokens[rows], rows)
                    recorder.maps = {}
                    with control.using(modulation, recorder):
                        eps_c = unet(z[rows], t_device, cond[rows])
                    landed = guided_step(eps_u[rows], eps_c, t, z[rows])
                    rec = (landed - target[rows]).square().flatten(1).mean(1)  # (A,)
                    att = sum((recorder.maps[name].float() - target_maps[name][rows]).square().flatten(1).mean(1)
                              for name in target_maps)
                    loss = rec + self.attention_weight * att
                    grads = torch.autograd.grad(loss.sum(), params)  # the networks' only, whatever the UNet's flags
                stopped = [b for b in range(batch) if b not in active]
                kept = [p.detach()[stopped] for p in params]  # copies: advanced indexing
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
                with torch.no_grad():
                    for p, k in zip(params, kept):
                        p[stopped] = k
                # the host decides who stops: one read per inner step
                step_losses = torch.stack([loss, rec, torch.as_tensor(att, device=device).expand_as(rec)]).tolist()
                for b, total, r, a in zip(active, *step_losses):
                    taken[b][i] += 1
                    if taken[b][i] == 1:
                        losses["first_loss"][b][i] = float(f"{total:.4g}")
                    for key, value in (("final_loss", total), ("rec_loss", r), ("att_loss", a)):
                        losses[key][b][i] = float(f"{value:.4g}")
                if threshold is not None:
                    active = [b for b, total in zip(active, step_losses[0]) if total >= threshold]
                if not active:
                    break
            with torch.no_grad():
                scale, shift = networks(tokens, every)  # B x 77 x D: M_i(E(x)), a constant from here on
                values.append((scale.detach().clone(), shift.detach().clone()))
                modulation.scale, modulation.shift = values[-1]
                with control.using(modulation):
                    eps_c = unet(z, t_device, cond)
                z = guided_step(eps_u, eps_c, t, z)
        modulation.scale = modulation.shift = None

        seconds = (time.perf_counter() - start) / batch
        # per image: the inversion (+ the paper's extra call), then per step eps_u, K forward+backward, the final eps_c
        evals = [num_steps + extra_calls + sum(2 + k for k in steps) for steps in taken]
        records = [{"method": self.name, "inner_steps": steps, **{key: value[b] for key, value in losses.items()},
                    "unet_evals": count, "unet_backwards": sum(steps), "seconds": round(seconds, 4)}
                   for b, (steps, count) in enumerate(zip(taken, evals))]
        return Inversion(trajectory[-1], values=values, unet_evals=round(sum(evals) / batch), records=records)
