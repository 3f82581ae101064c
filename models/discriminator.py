"""Conditional StyleGAN2 residual discriminator for Co-Mod-GAN translation.

It scores ``concat(condition, image)`` (2 x img_channels channels): the input image and a real or
generated output, so it judges the pair, not only the output's realism. Layout as StyleGAN2's
"resnet" discriminator (and Co-Mod-GAN's ``D_co_mod_gan``), with ``C(r) = min(channel_base // r,
channel_max)`` channels at resolution r:

    fromRGB 1x1 -> per resolution R, ..., 8: residual block (3x3 conv, downsampling 3x3 conv,
    1x1 downsampling skip without bias; both branches scaled by sqrt(1/2))
    -> 4x4: minibatch std (+1 channel), 3x3 conv, dense C(4)*16 -> C(4), dense C(4) -> 1 logit

Parameter count, with c = img_channels and r over 8, 16, ..., R:

    2c C(R) + C(R) + sum_r [9 C(r)^2 + C(r) + 9 C(r) C(r/2) + C(r/2) + C(r) C(r/2)]
    + 9 (C(4) + 1) C(4) + C(4) + 16 C(4)^2 + C(4) + C(4) + 1

The 256 preset has 28,864,513 parameters, the 512 preset 28,983,041.
Resampling is the FIR filter of ``models.layers``. Input size: exactly resolution x resolution.
"""
import math

import torch
from torch import Tensor, nn

from models.comodgan import channels_at, check_resolution
from models.layers import Conv2d, FullyConnected, MinibatchStd


class DiscriminatorBlock(nn.Module):
    """Residual block at resolution r: C(r) channels in, C(r/2) out at half the resolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = Conv2d(in_channels, in_channels, 3)
        self.conv1 = Conv2d(in_channels, out_channels, 3, down=True, gain=math.sqrt(0.5))
        self.skip = Conv2d(in_channels, out_channels, 1, bias=False, activation=False, down=True,
                           gain=math.sqrt(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.conv1(self.conv0(x))


class Discriminator(nn.Module):
    """D(condition, image) -> B x 1 logits; both inputs B x img_channels x R x R in [-1, 1]."""

    def __init__(self, resolution: int, channel_base: int = 32768, channel_max: int = 512,
                 mbstd_group: int = 4, img_channels: int = 3):
        super().__init__()
        check_resolution(resolution, channel_base)
        ch = lambda r: channels_at(r, channel_base, channel_max)
        resolutions = [resolution >> i for i in range(resolution.bit_length() - 3)]  # R, R/2, ..., 8
        self.resolution = resolution
        self.from_rgb = Conv2d(2 * img_channels, ch(resolution), 1)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(ch(r), ch(r // 2)) for r in resolutions])
        self.mbstd = MinibatchStd(mbstd_group)
        self.conv = Conv2d(ch(4) + 1, ch(4), 3)
        self.fc = FullyConnected(ch(4) * 16, ch(4), activation=True)
        self.out = FullyConnected(ch(4), 1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, condition: Tensor, image: Tensor) -> Tensor:
        if image.shape[-1] != self.resolution or image.shape[-2] != self.resolution:
            raise ValueError(f"Discriminator expects {self.resolution}x{self.resolution} images, "
                             f"got {image.shape[-2]}x{image.shape[-1]}")
        x = self.blocks(self.from_rgb(torch.cat([condition, image], dim=1)))
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1)))
