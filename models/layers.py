"""StyleGAN2 layers shared by the Co-Mod-GAN generator and discriminator, in pure PyTorch.

Equalized learning rate (StyleGAN): weights are stored with unit variance and scaled at run
time by ``lr_multiplier / sqrt(fan_in)``, so Adam moves every layer at the same relative speed;
the mapping network uses ``lr_multiplier = 0.01``.

Resampling uses StyleGAN2's fixed low-pass FIR filter ``[1, 3, 3, 1]`` (outer product,
normalised to sum 1). A resampling k x k convolution and the filter are both linear, so they are
composed into one (k + 3) x (k + 3) kernel ``K = w * f`` (full 2D convolution of the weight with the
filter, computed per call by a tiny matmul) and run as a single strided convolution:

- downsampling conv: StyleGAN2 filters with padding ``k // 2 + 1`` and then convolves with
  stride 2; identical to ``conv2d(x, w * f, stride=2, padding=k // 2 + 1)``;
- upsampling conv: StyleGAN2 runs a stride-2 transposed convolution and then the filter with
  gain 4 (zero insertion quarters the mean); identical to
  ``conv_transpose2d(x, w * 4f, stride=2, padding=(k + 1) // 2)``;
- the toRGB skip's plain x2 upsampling is the same with w = 1: a depthwise transposed conv.

Composition costs 4x the multiply-adds of the small conv but replaces a separate depthwise
filter pass, which cuDNN runs slowly in channels_last (measured on an H100: the depthwise
filters took over half of the generator's time).

No custom CUDA/C++ operators, so every module here scripts with ``torch.jit.script`` and runs
under autocast (fp16/bf16) and with ``channels_last`` tensors.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FIR_TAPS = (1.0, 3.0, 3.0, 1.0)


def lrelu(x: Tensor) -> Tensor:
    """Leaky ReLU (slope 0.2) times sqrt(2), which restores unit variance (StyleGAN convention)."""
    return F.leaky_relu(x, 0.2) * 1.4142135623730951


def fir_kernel(channels: int, gain: float = 1.0) -> Tensor:
    """Depthwise conv weight [channels, 1, 4, 4] of the separable binomial filter, summing to `gain`."""
    taps = torch.tensor(FIR_TAPS)
    kernel = torch.outer(taps, taps)
    kernel = kernel * (gain / kernel.sum())
    return kernel.expand(channels, 1, len(FIR_TAPS), len(FIR_TAPS)).contiguous()


def fir_placement(kernel_size: int, gain: float = 1.0) -> Tensor:
    """P[a, b, u, v] = f[u - a, v - b]: ``einsum("oiab,abuv->oiuv", w, P)`` is the full 2D
    convolution of a k x k weight with the FIR filter f (sum `gain`), a (k + 3) x (k + 3) kernel."""
    f = fir_kernel(1, gain)[0, 0]
    taps = f.shape[0]
    placement = torch.zeros(kernel_size, kernel_size, kernel_size + taps - 1, kernel_size + taps - 1)
    for a in range(kernel_size):
        for b in range(kernel_size):
            placement[a, b, a:a + taps, b:b + taps] = f
    return placement


class Upsample(nn.Module):
    """x2 upsampling: zero insertion + FIR filter (gain 4) as one transposed depthwise conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("kernel", fir_kernel(channels, gain=4.0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # Padding 1 crops the 4-tap filter's overhang: [B, C, H, W] -> [B, C, 2H, 2W].
        return F.conv_transpose2d(x, self.kernel, stride=2, padding=1, groups=self.channels)


class FullyConnected(nn.Module):
    """Equalized-lr dense layer, optionally followed by a leaky ReLU."""

    def __init__(self, in_features: int, out_features: int, activation: bool = False,
                 bias_init: float = 0.0, lr_multiplier: float = 1.0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_multiplier))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return lrelu(x) if self.activation else x


class Conv2d(nn.Module):
    """Equalized-lr convolution with bias and leaky ReLU; ``down=True`` halves the resolution.

    ``gain`` scales the output (the discriminator's residual blocks use sqrt(1/2) on both branches).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: bool = True, down: bool = False, gain: float = 1.0):
        super().__init__()
        self.activation, self.gain = activation, gain
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.down = down
        self.register_buffer("fir", fir_placement(kernel_size) if down else torch.zeros(0), persistent=False)
        self.stride = 2 if down else 1
        self.padding = kernel_size // 2 + 1 if down else kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight * self.weight_gain
        if self.down:
            weight = torch.einsum("oiab,abuv->oiuv", weight, self.fir)
        x = F.conv2d(x, weight, self.bias, self.stride, self.padding)
        x = lrelu(x) if self.activation else x
        return x * self.gain if self.gain != 1.0 else x


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution plus bias (no activation), optionally upsampling x2.

    The layer's style ``s = affine(style)`` (initially 1) scales each input channel of the
    weight; demodulation then rescales each output channel by
    ``d[b, o] = 1 / sqrt(sum_{i,kh,kw} (weight[o, i, kh, kw] * s[b, i])^2)`` so that unit-variance
    inputs give unit-variance outputs. Two equivalent executions:

    - ``grouped=True``: one per-sample weight for the whole batch, run as a grouped convolution
      (StyleGAN2's "fused modconv");
    - ``grouped=False``: scale the activations by ``s`` before and by ``d`` after one ordinary
      convolution with the shared weight. Same result (convolution is linear per channel), no
      per-sample weights, and cuDNN's fastest plain-convolution kernels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, up: bool = False, grouped: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.up, self.grouped = demodulate, up, grouped
        self.affine = FullyConnected(style_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.register_buffer("fir", fir_placement(kernel_size, gain=4.0) if up else torch.zeros(0), persistent=False)
        self.padding = (kernel_size + 1) // 2 if up else kernel_size // 2

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        s = self.affine(style)                                                     # [B, I]
        weight = self.weight * self.weight_gain                                    # [O, I, k, k]
        d = torch.ones_like(s[:, :1])                                              # [B, 1]
        if self.demodulate:
            d = torch.rsqrt(s.square() @ weight.square().sum([2, 3]).t() + 1e-8)   # [B, O]

        if self.up:
            weight = torch.einsum("oiab,abuv->oiuv", weight, self.fir)                  # [O, I, k+3, k+3]
        bias = self.bias[None, :, None, None]

        if self.grouped:
            w = weight[None] * s[:, None, :, None, None] * d[:, :, None, None, None]     # [B, O, I, k', k']
            x = x.reshape(1, batch * self.in_channels, height, width)
            if self.up:  # conv_transpose2d weights are [in, out / groups, k', k']
                x = F.conv_transpose2d(x, w.transpose(1, 2).flatten(0, 1), stride=2, padding=self.padding, groups=batch)
            else:
                x = F.conv2d(x, w.flatten(0, 1), padding=self.padding, groups=batch)
            return x.reshape(batch, self.out_channels, x.shape[2], x.shape[3]) + bias

        x = x * s[:, :, None, None]
        if self.up:
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2, padding=self.padding)
        else:
            x = F.conv2d(x, weight, padding=self.padding)
        return torch.addcmul(bias, x, d[:, :, None, None])


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution, per-pixel noise (training only), bias and leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, up: bool = False,
                 grouped: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, style_dim, up=up, grouped=grouped)
        # Starts at 0 as in Co-Mod-GAN: the generator learns how much noise it wants.
        self.noise_strength = nn.Parameter(torch.zeros([]))

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        x = self.conv(x, style)
        if self.training:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength
        return lrelu(x)


class MinibatchStd(nn.Module):
    """Appends one channel: the mean standard deviation of features within groups of samples.

    Group size is ``gcd(batch, group_size)`` so any batch size works (a batch of 6 with group 4
    uses groups of 2); sample ``n`` belongs to group ``n % (batch // group)`` as in StyleGAN2.
    """

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        group = math.gcd(batch, self.group_size)
        y = x.float().reshape(group, batch // group, channels, height, width)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()                     # [M, C, H, W]
        y = y.mean([1, 2, 3]).reshape(1, batch // group, 1, 1)                      # [1, M, 1, 1]
        y = y.repeat(group, 1, height, width).reshape(batch, 1, height, width)
        return torch.cat([x, y.to(x.dtype)], dim=1)
