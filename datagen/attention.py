"""Cross-attention processors that record the reference pass's maps and give the edit pass its loss.

Only the `attn2` (cross-attention) layers get these processors; every other attention keeps diffusers'
fused SDPA processor. A cross-attention map is tokens-wide (77), so materialising it is cheap, unlike
the HW x HW self-attention maps the official code also materialised.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers.models.attention_processor import Attention, AttentionProcessor, AttnProcessor2_0
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel


class CrossAttentionStore:
    """Shared state of all cross-attention processors of one UNet.

    mode "off": fused attention, nothing kept. "record": keep each layer's probabilities
    (batch*heads x HW x 77) in `maps`. "guide": add each layer's squared distance to `maps` into `loss`.
    """

    def __init__(self) -> None:
        self.mode = "off"
        self.maps: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | float = 0.0  # per sample (B,) in "guide" mode

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        self.mode, self.maps = "record", {}
        try:
            yield self.maps
        finally:
            self.mode = "off"

    @contextmanager
    def guiding(self, reference: dict[str, torch.Tensor]) -> Iterator["CrossAttentionStore"]:
        self.mode, self.maps, self.loss = "guide", reference, 0.0
        try:
            yield self
        finally:
            self.mode, self.maps = "off", {}


class CrossAttentionProcessor:
    """Attention with explicit probabilities softmax(QK^T / sqrt(d)) when the store needs them."""

    def __init__(self, name: str, store: CrossAttentionStore) -> None:
        self.name, self.store, self.fused = name, store, AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if self.store.mode == "off":
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        assert hidden_states.ndim == 3 and not attn.norm_cross and attn.spatial_norm is None
        residual = hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, HW, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*heads, 77, d)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (B*heads, HW, 77)
        if self.store.mode == "record":
            self.store.maps[self.name] = probs.detach()
        else:
            # The official loss of one sample: sum over (HW, tokens), mean over its rows (2 guidance halves x heads).
            # Rows are ordered (half, sample, head) because the batch is cat([uncond, cond]).
            per_row = (probs - self.store.maps[self.name]).pow(2).sum(dim=(1, 2))
            per_sample = per_row.view(2, -1, attn.heads).mean(dim=(0, 2))
            self.store.loss = self.store.loss + per_sample
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_processors(unet: UNet2DConditionModel) -> tuple[CrossAttentionStore, dict[str, AttentionProcessor]]:
    """Our processor for every `attn2` layer (SDPA elsewhere), keyed as `unet.attn_processors`, and the store they
    share. An editor installs its own with `unet.set_attn_processor(dict(processors))` at every edit, so editors
    sharing one UNet (eager and compiled, the benchmark's reference) never run on each other's processors, and a
    compiled UNet always meets the processor objects it was traced with."""
    store = CrossAttentionStore()
    processors = {key: CrossAttentionProcessor(key.removesuffix(".processor"), store) if key.endswith("attn2.processor")
                  else AttnProcessor2_0() for key in unet.attn_processors}
    return store, processors
