"""Tiny random-weight components shared by the engine tests (built once per test module), and stand-ins for the
UNet that are smooth functions of x_t, as a trained one is and a random one is not."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttentionProcessor

from datagen.backbone import Backbone, tiny_backbone

RESOLUTION = 64


def make_backbone() -> Backbone:
    return tiny_backbone(seed=0).to(torch.device("cpu"), torch.float32)


def random_direction(backbone, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(1, 77, backbone.text_encoder.config.hidden_size, generator=g)


class TimeOnlyUNet(torch.nn.Module):
    """A noise predictor that depends on t and the text but not on x_t: there DDIM inversion is exact.
    (Zeroing a real UNet's conv_in does not give this: GroupNorm of constant maps amplifies float noise.)"""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.config, self.table = unet.config, torch.nn.Parameter(torch.randn(1000, 4, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        eps = self.table[t.long()] * (1 + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))
        return SimpleNamespace(sample=eps.expand_as(x) + 0 * x)

    @property
    def attn_processors(self) -> dict[str, AttentionProcessor]:
        return {}  # no attention layers: nothing for an editor to install

    def set_attn_processor(self, processors: dict[str, AttentionProcessor]) -> None:
        pass

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class SmoothAttentionUNet(TimeOnlyUNet):
    """eps = table[t] + 0.1 x_t + one cross-attention layer (its pixels' latents as queries, the text as keys),
    named like SD's so that an editor reads and guides its maps. Smooth in x_t, so DDIM inversion does not amplify
    float-order differences (a random UNet's do, ~5x per step), and its maps, sharpened, are far from uniform."""

    def __init__(self, unet: torch.nn.Module, text_dim: int, sharpening: float = 4.0, seed: int = 0) -> None:
        super().__init__(unet)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.attn2 = Attention(query_dim=4, cross_attention_dim=text_dim, heads=2, dim_head=8)
        with torch.no_grad():
            self.attn2.to_q.weight.mul_(sharpening)
            self.attn2.to_k.weight.mul_(sharpening)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        attended = self.attn2(x.flatten(2).transpose(1, 2), encoder_hidden_states=encoder_hidden_states)
        return SimpleNamespace(sample=self.table[t.long()] + 0.1 * x + attended.transpose(1, 2).reshape(x.shape))

    @property
    def attn_processors(self) -> dict[str, AttentionProcessor]:
        return {"attn2.processor": self.attn2.processor}

    def set_attn_processor(self, processors: dict[str, AttentionProcessor]) -> None:
        self.attn2.set_processor(processors.pop("attn2.processor"))


class PoolingVAE(torch.nn.Module):
    """A stand-in VAE, smooth and exact sample by sample: the latents are the image 2x2-average-pooled (its three
    channels and their mean), decoding upsamples the first three. (A random VAE's decoder turns a latent difference
    of 2e-7, a batched convolution's rounding in the encoder, into 1e-5 in the image.)"""

    config = SimpleNamespace(block_out_channels=(32, 64), scaling_factor=1.0)  # what Backbone reads: 2x, unscaled

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        pooled = F.avg_pool2d(images, 2)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=F.interpolate(latents[:, :3], scale_factor=2, mode="nearest"))


def smooth_backbone() -> Backbone:
    """The tiny backbone (its text encoder, tokenizer and schedule) with SmoothAttentionUNet and PoolingVAE."""
    backbone = make_backbone()
    backbone.unet = SmoothAttentionUNet(backbone.unet, backbone.text_encoder.config.hidden_size)
    backbone.vae = PoolingVAE()
    return backbone
