"""Co-Mod-GAN generator (Zhao et al., ICLR 2021) for paired image-to-image translation.

Structure follows the official TensorFlow code (zsyzzsoft/co-mod-gan, ``G_synthesis_co_mod_gan``)
with StyleGAN2 layers from ``models.layers``; two deliberate differences: the input is the whole
image (no inpainting mask, no compositing), and dropout on the global code is off in eval mode.

    image [B, 3, R, R] --Encoder--> skips at R, R/2, ..., 4   +   global code [B, code_dim]
    z [B, z_dim] --MappingNetwork--> w [B, w_dim]              (eval: w = w_avg, no mapping)
    style = concat(w, code): every modulated layer's style is its own affine map of it
    Decoder: 4x4 from a dense map of the code, then per resolution an upsampling modulated
    conv, + encoder skip, a modulated conv, and a toRGB output added to the upsampled sum.

Channels at resolution r: ``C(r) = min(channel_base // r, channel_max)`` (32768 and 512 give 512
up to 64 px, then 256, 128, 64 at 512 px).

Parameter count, with S = w_dim + code_dim, D = code_dim, c = img_channels, L = mapping_layers
and r running over 8, 16, ..., R (each "+ n" a bias):

    mapping  = z_dim * w_dim + w_dim + (L - 1) * (w_dim^2 + w_dim)
    encoder  = c * C(R) + C(R)                                        fromRGB 1x1
             + sum_r [9 C(r)^2 + C(r) + 9 C(r) C(r/2) + C(r/2)]       conv, downsampling conv
             + 9 C(4)^2 + C(4) + 16 C(4) D + D                        4x4 conv, dense to the code
    decoder  = 16 C(4) D + 16 C(4)                                    dense from the code
             + mod(C(4), C(4)) + rgb(C(4))
             + sum_r [mod(C(r/2), C(r)) + mod(C(r), C(r)) + rgb(C(r))]
    mod(i, o) = 9 i o + o + S i + i + 1      weight, bias, affine, noise strength
    rgb(i)    = c i + c + S i + i            1x1 weight, bias, affine

The 256 preset has 79,177,250 parameters and the 512 preset 79,792,167 (``tests/test_models.py``
prints and checks both); the two 4x4 dense layers hold 16.8 M of them.

Input size: exactly ``resolution`` x ``resolution`` (the dense layers at 4x4 fix it); any other
size raises a ValueError. Eval mode is deterministic: no dropout, no noise, and unless a ``z``
is given, ``w = w_avg`` (the running mean of mapped latents, as StyleGAN tracks for truncation:
the most typical style), so the mapping network is skipped at inference.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from models.layers import Conv2d, FullyConnected, ModulatedConv2d, SynthesisLayer, Upsample


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


def check_resolution(resolution: int, channel_base: int) -> None:
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
    if channel_base // resolution < 1:
        raise ValueError(f"channel_base={channel_base} gives no channels at {resolution}px; "
                         f"use channel_base >= resolution")


class MappingNetwork(nn.Module):
    """z -> w: normalise z to unit second moment, then `num_layers` dense layers (lr x 0.01)."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = 8, lr_multiplier: float = 0.01):
        super().__init__()
        features = [z_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(*[
            FullyConnected(i, o, activation=True, lr_multiplier=lr_multiplier) for i, o in zip(features[:-1], features[1:])])

    def forward(self, z: Tensor) -> Tensor:
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        return self.layers(z)


class EncoderBlock(nn.Module):
    """At resolution r: 3x3 conv (its output is the skip feature), then a downsampling 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = Conv2d(in_channels, in_channels, 3)
        self.down = Conv2d(in_channels, out_channels, 3, down=True)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        skip = self.conv(x)
        return self.down(skip), skip


class Encoder(nn.Module):
    """Image -> (skip features at 4, 8, ..., R, global code); dropout on the code in training only."""

    def __init__(self, resolution: int, channel_base: int, channel_max: int, code_dim: int,
                 dropout: float, img_channels: int):
        super().__init__()
        ch = lambda r: channels_at(r, channel_base, channel_max)
        resolutions = [resolution >> i for i in range(resolution.bit_length() - 3)]  # R, R/2, ..., 8
        self.from_rgb = Conv2d(img_channels, ch(resolution), 1)
        self.blocks = nn.ModuleList([EncoderBlock(ch(r), ch(r // 2)) for r in resolutions])
        self.conv = Conv2d(ch(4), ch(4), 3)
        self.to_code = FullyConnected(ch(4) * 16, code_dim, activation=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, image: Tensor) -> Tuple[List[Tensor], Tensor]:
        x = self.from_rgb(image)
        skips: List[Tensor] = []
        for block in self.blocks:
            x, skip = block(x)
            skips.insert(0, skip)
        x = self.conv(x)
        skips.insert(0, x)
        code = self.dropout(self.to_code(x.flatten(1)))
        return skips, code


class DecoderBlock(nn.Module):
    """At resolution r: upsampling modulated conv, + encoder skip, modulated conv, toRGB."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, img_channels: int,
                 grouped: bool):
        super().__init__()
        self.conv0 = SynthesisLayer(in_channels, out_channels, style_dim, up=True, grouped=grouped)
        self.conv1 = SynthesisLayer(out_channels, out_channels, style_dim, grouped=grouped)
        self.to_rgb = ModulatedConv2d(out_channels, img_channels, 1, style_dim, demodulate=False, grouped=grouped)
        self.upsample_rgb = Upsample(img_channels)

    def forward(self, x: Tensor, rgb: Tensor, skip: Tensor, style: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.conv1(self.conv0(x, style) + skip, style)
        return x, self.upsample_rgb(rgb) + self.to_rgb(x, style)


class Decoder(nn.Module):
    """(global code, skips, style) -> image; StyleGAN2 "skip" synthesis with encoder features added."""

    def __init__(self, resolution: int, channel_base: int, channel_max: int, code_dim: int,
                 style_dim: int, img_channels: int, grouped: bool):
        super().__init__()
        ch = lambda r: channels_at(r, channel_base, channel_max)
        resolutions = [8 << i for i in range(resolution.bit_length() - 3)]  # 8, 16, ..., R
        self.base_channels = ch(4)
        self.from_code = FullyConnected(code_dim, ch(4) * 16, activation=True)
        self.conv = SynthesisLayer(ch(4), ch(4), style_dim, grouped=grouped)
        self.to_rgb = ModulatedConv2d(ch(4), img_channels, 1, style_dim, demodulate=False, grouped=grouped)
        self.blocks = nn.ModuleList([
            DecoderBlock(ch(r // 2), ch(r), style_dim, img_channels, grouped) for r in resolutions])

    def forward(self, code: Tensor, skips: List[Tensor], style: Tensor) -> Tensor:
        x = self.from_code(code).reshape(-1, self.base_channels, 4, 4) + skips[0]
        x = self.conv(x, style)
        rgb = self.to_rgb(x, style)
        for i, block in enumerate(self.blocks):
            x, rgb = block(x, rgb, skips[i + 1], style)
        return rgb


class Generator(nn.Module):
    """Co-Mod-GAN image-to-image generator: B x 3 x R x R in [-1, 1] -> B x 3 x R x R.

    Training mode returns the raw (linear) toRGB sum, so every pixel keeps its gradient;
    eval mode clamps to [-1, 1]. ``grouped_modconv`` picks the execution of the modulated
    convolutions (see ``ModulatedConv2d``); both compute the same function.
    """

    def __init__(self, resolution: int, channel_base: int = 32768, channel_max: int = 512,
                 z_dim: int = 512, w_dim: int = 512, code_dim: int = 1024, mapping_layers: int = 8,
                 dropout: float = 0.5, img_channels: int = 3, w_avg_beta: float = 0.995,
                 grouped_modconv: bool = False):
        super().__init__()
        check_resolution(resolution, channel_base)
        self.resolution, self.z_dim, self.w_avg_beta = resolution, z_dim, w_avg_beta
        self.encoder = Encoder(resolution, channel_base, channel_max, code_dim, dropout, img_channels)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers)
        self.decoder = Decoder(resolution, channel_base, channel_max, code_dim, w_dim + code_dim,
                               img_channels, grouped_modconv)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, image: Tensor, z: Optional[Tensor] = None) -> Tensor:
        if image.shape[-1] != self.resolution or image.shape[-2] != self.resolution:
            raise ValueError("Generator expects " + str(self.resolution) + "x" + str(self.resolution)
                             + " images, got " + str(image.shape[-2]) + "x" + str(image.shape[-1]))
        skips, code = self.encoder(image)
        w = self.style_latent(z, image)
        rgb = self.decoder(code, skips, torch.cat([w, code], dim=1))
        return rgb if self.training else rgb.clamp(-1.0, 1.0)

    def style_latent(self, z: Optional[Tensor], image: Tensor) -> Tensor:
        """w for each sample: mapped from z (random in training), or w_avg in eval without z."""
        if z is None:
            if not self.training:
                return self.w_avg.to(image.dtype)[None].expand(image.shape[0], -1)
            latent = torch.randn(image.shape[0], self.z_dim, device=image.device, dtype=image.dtype)
        else:
            latent = z
        w = self.mapping(latent)
        if self.training:
            self.w_avg.copy_(w.detach().mean(0).to(self.w_avg.dtype).lerp(self.w_avg, self.w_avg_beta))
        return w
