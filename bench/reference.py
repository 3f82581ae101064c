"""The reference loop for the generation benchmark, written after the official pix2pix-zero code
(pix2pixzero/pix2pix-zero, src/utils/edit_pipeline.py and cross_attention.py; METHOD.md section 3).

What makes it the official loop, cost and all:
- one pair at a time (the official pipeline takes batch 1);
- every attention layer, self and cross, computes softmax(QK^T / sqrt(d)) explicitly and keeps its last
  map (HW x HW for self-attention), as the official processor does;
- `prep_unet` makes the cross-attention weights require grad, so each edit step's backward also computes
  their gradients (taken here with autograd.grad, so they do not pile up in `.grad`);
- the whole reference pass runs first, storing every cross-attention map of every step on the CPU; the
  edit pass copies step t's maps back to the device;
- latents stay in the UNet's precision (the official code runs fp32, or fp16 as its option).
The edit rule is the official one: one SGD step of size xa_guidance on both guidance halves, the noise
recomputed from the moved halves, and the unconditional half carried forward.

Real inputs are inverted with our `ddim_invert` (the same algorithm as the official ddim_inv.py), one at a
time and under the official attention, so both editors start the edit from the same x_T; its noise regularizer
takes each gradient with autograd through the loss, as ddim_inv.py does (over all channels at once, where the
official code loops over them: fewer ops than the official one, so the comparison errs in its favour).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention

from datagen.backbone import Backbone
from datagen.inversions.ddim import NoiseRegularizer, PyramidRolls, autocorrelation_loss, ddim_invert, kl_loss


def autograd_grad(loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(leaf), leaf)
    return grad


class AutogradRegularizer(NoiseRegularizer):
    """Our regularizer's steps and offsets, with the official code's gradients: autograd through each loss."""

    def autocorrelation_grad(self, noise: torch.Tensor, rolls: PyramidRolls) -> torch.Tensor:
        return autograd_grad(lambda x: autocorrelation_loss(x, rolls), noise)

    def kl_grad(self, noise: torch.Tensor) -> torch.Tensor:
        return autograd_grad(kl_loss, noise)


class MaterializedAttention:
    """The official processor: explicit attention probabilities, the last ones kept in `probs`."""

    def __init__(self) -> None:
        self.probs: torch.Tensor | None = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, HW, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (B*heads, HW or 77, d)
        value = attn.head_to_batch_dim(attn.to_v(context))
        self.probs = attn.get_attention_scores(query, key, None)  # (B*heads, HW, HW or 77)
        out = attn.batch_to_head_dim(torch.bmm(self.probs, value))
        return attn.to_out[1](attn.to_out[0](out))


@contextmanager
def official_unet(unet: torch.nn.Module) -> Iterator[dict[str, MaterializedAttention]]:
    """The UNet as the official `prep_unet` leaves it, for the duration of the block; yields the `attn2`
    processors by layer name. The previous processors and requires_grad flags come back afterwards."""
    modules = {name: module for name, module in unet.named_modules() if isinstance(module, Attention)}
    saved_processors = {name: module.processor for name, module in modules.items()}
    saved_flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    processors = {name: MaterializedAttention() for name in modules}
    for name, module in modules.items():
        module.set_processor(processors[name])
    for name, param in unet.named_parameters():
        param.requires_grad_("attn2" in name)
    try:
        yield {name: processor for name, processor in processors.items() if name.endswith("attn2")}
    finally:
        for name, module in modules.items():
            module.set_processor(saved_processors[name])
        for name, param in unet.named_parameters():
            param.requires_grad_(saved_flags[name])


class ReferenceEditor:
    """One pair per call, as the official code; `edit` returns (reference image, edited image) in [0, 1]."""

    def __init__(self, backbone: Backbone, direction: torch.Tensor, num_inference_steps: int, num_inversion_steps: int,
                 guidance_scale: float = 5.0, xa_guidance_real: float = 0.1, xa_guidance_synthetic: float = 0.15,
                 regularizer: NoiseRegularizer | None = None) -> None:
        self.backbone, self.direction = backbone, direction.to(backbone.device, backbone.dtype)
        self.num_inference_steps, self.num_inversion_steps = num_inference_steps, num_inversion_steps
        self.guidance_scale, self.regularizer = guidance_scale, regularizer
        self.xa_guidance = {"real": xa_guidance_real, "synthetic": xa_guidance_synthetic}

    def edit(self, prompt: str, x_T: torch.Tensor | None = None, image: torch.Tensor | None = None,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A synthetic pair from noise `x_T` (1 x 4 x h x w), or a real one from `image` (1 x 3 x H x W in
        [0, 1], inverted with the sample's `seed` for the regularizer's shifts)."""
        bb = self.backbone
        cond = bb.encode_text([prompt])
        with official_unet(bb.unet) as cross_attention:
            if image is None:
                kind, uncond = "synthetic", bb.encode_text([""])
            else:  # the caption is also the negative prompt
                kind, uncond = "real", cond
                latents = bb.encode_images(image * 2 - 1)
                x_T = ddim_invert(bb, latents, cond, self.num_inversion_steps, self.regularizer,
                                  [torch.Generator().manual_seed(seed)])
            reference, maps = self.reference_pass(x_T, torch.cat([uncond, cond]), cross_attention)
            edited = self.edit_pass(x_T, torch.cat([uncond, cond + self.direction]), maps, cross_attention,
                                    self.xa_guidance[kind])
        return bb.decode_latents(reference), bb.decode_latents(edited)

    def guided_noise(self, noise: torch.Tensor) -> torch.Tensor:
        uncond, cond = noise.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    @torch.no_grad()
    def reference_pass(self, x_T: torch.Tensor, context: torch.Tensor, cross_attention: dict[str, MaterializedAttention]
                       ) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
        unet, scheduler = self.backbone.unet, self.backbone.scheduler
        scheduler.set_timesteps(self.num_inference_steps, device=x_T.device)
        maps: dict[int, dict[str, torch.Tensor]] = {}
        latents = x_T.to(self.backbone.dtype)
        for t in scheduler.timesteps:
            noise = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
            maps[int(t)] = {name: processor.probs.cpu() for name, processor in cross_attention.items()}
            latents = scheduler.step(self.guided_noise(noise), t, latents).prev_sample
        return latents, maps

    def edit_pass(self, x_T: torch.Tensor, context: torch.Tensor, maps: dict[int, dict[str, torch.Tensor]],
                  cross_attention: dict[str, MaterializedAttention], xa_guidance: float) -> torch.Tensor:
        unet, scheduler, device = self.backbone.unet, self.backbone.scheduler, x_T.device
        attn2_weights = [param for param in unet.parameters() if param.requires_grad]
        latents = x_T.to(self.backbone.dtype)
        for t in scheduler.timesteps:
            x_in = torch.cat([latents, latents]).requires_grad_(True)
            with torch.enable_grad():
                unet(x_in, t, encoder_hidden_states=context)
                # per layer: sum over (HW, tokens), mean over the rows (2 guidance halves x heads)
                loss = sum((processor.probs - maps[int(t)][name].to(device)).pow(2).sum(dim=(1, 2)).mean()
                           for name, processor in cross_attention.items())
                grad = torch.autograd.grad(loss, [x_in, *attn2_weights], allow_unused=True)[0]
            x_in = x_in.detach() - xa_guidance * grad
            with torch.no_grad():
                noise = unet(x_in, t, encoder_hidden_states=context).sample
            latents = scheduler.step(self.guided_noise(noise), t, x_in.chunk(2)[0]).prev_sample
        return latents
