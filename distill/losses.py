"""Distillation losses: L1 + LPIPS (VGG) regression to the teacher's edit, and the conditional
non-saturating GAN loss with lazy R1 on real pairs (StyleGAN2, Karras et al. 2020).

Images are B x 3 x R x R in [-1, 1]; losses are means over the batch.
"""
from __future__ import annotations

import urllib.error
import warnings

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MissingWeightsError(RuntimeError):
    """A pretrained network could not be loaded (typically: no network access)."""


TRUNK_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def build_lpips(pretrained: bool = True, net: str = "vgg", seed: int | None = None,
                offline_hint: str = "distill.lpips_pretrained_vgg=false") -> nn.Module:
    """Frozen LPIPS (VGG, or "alex"). The linear heads ship with the `lpips` package; the trunk is torchvision's
    ImageNet weights (downloaded once into $TORCH_HOME), or random with `pretrained=False`: drawn from `seed`
    without touching the global RNG where one is given (metrics: the same trunk in every run), else from the global
    RNG (`offline_hint`: the setting that asks for the random trunk, for the error)."""
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[], enabled=seed is not None):
            warnings.simplefilter("ignore", UserWarning)  # lpips calls torchvision's deprecated `pretrained=` argument
            if seed is not None:
                torch.manual_seed(seed)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained, verbose=False)
    except (urllib.error.URLError, OSError) as error:
        raise MissingWeightsError(
            f"LPIPS({net}) needs torchvision's ImageNet weights ({TRUNK_FILES[net]}) and could not download "
            f"them ({error}). Put the file into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch), or, for "
            f"tests and smoke runs only, use a random trunk: {offline_hint}") from None
    return model.eval().requires_grad_(False)


def psnr(output: Tensor, target: Tensor) -> Tensor:
    """Per-sample PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (output.float() - target.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def generator_adversarial(fake_logits: Tensor) -> Tensor:
    """Non-saturating: -log sigmoid(D(x, G(x)))."""
    return F.softplus(-fake_logits).mean()


def discriminator_adversarial(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-log sigmoid(D(x, y)) - log(1 - sigmoid(D(x, G(x))))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def r1_penalty(discriminator: nn.Module, condition: Tensor, real: Tensor) -> Tensor:
    """E ||d D(x, y) / d y||^2 on real pairs, the gradient taken with respect to the output image only."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(condition, real)
    (gradient,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return gradient.float().square().sum(dim=(1, 2, 3)).mean()
