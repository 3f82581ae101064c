from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from datagen.inversion import NoiseRegularizer, autocorrelation_loss, ddim_invert, kl_loss
from engine_fixtures import make_backbone


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def correlated(shape, seed=0):
    """Gaussian noise blurred 5x5 and renormalised: unit variance, strong spatial correlation."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="circular"), 5, stride=1)
    return (x - x.mean()) / x.std()


def test_regularizer_small_on_white_large_on_correlated_noise():
    white = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    blurred = correlated((2, 4, 64, 64))
    assert autocorrelation_loss(white, gens(2)) < 0.01
    assert autocorrelation_loss(blurred, gens(2)) > 10 * autocorrelation_loss(white, gens(2))
    assert abs(kl_loss(white).item()) < 0.01
    assert kl_loss(3 * white + 1).item() > 10


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.0])
def test_regularizer_steps_move_noise_toward_white(scale):
    """Default strength (5 x (5 AC steps + 1 KL step), lambda 20): measured AC 1.42 -> 0.82 at unit scale,
    KL 1.50 -> 0.92 at scale 0.3 and 1.61 -> 0.43 at scale 2."""
    noise = scale * correlated((1, 4, 32, 32))
    after = NoiseRegularizer()(noise, gens(1))
    objective = lambda x: autocorrelation_loss(x, gens(1, 5)) + kl_loss(x)  # noqa: E731
    assert objective(after) < 0.7 * objective(noise)


def test_shifts_never_zero():
    # d = 0 would penalise the variance instead of the correlation (a bug of an early official version):
    # a constant map has variance 0 but autocorrelation 1 at every offset.
    ones = torch.ones(1, 1, 16, 16)
    for seed in range(20):
        assert autocorrelation_loss(ones, gens(1, seed)).item() == 2 * 2  # 2 levels (16, 8) x 2 directions x 1^2


class TimeOnlyUNet(torch.nn.Module):
    """A noise predictor that depends on t and the text but not on x_t: there DDIM inversion is exact.
    (Zeroing a real UNet's conv_in does not give this: GroupNorm of constant maps amplifies float noise.)"""

    attn_processors: dict = {}  # no attention layers: nothing for an editor to install

    def __init__(self, unet):
        super().__init__()
        self.config, self.table = unet.config, torch.nn.Parameter(torch.randn(1000, 4, 1, 1), requires_grad=False)

    def forward(self, x, t, encoder_hidden_states):
        eps = self.table[t.long()] * (1 + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))
        return SimpleNamespace(sample=eps.expand_as(x) + 0 * x)

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")


def test_inversion_then_reconstruction_returns_the_input():
    """No regularization, no guidance. DDIM inversion is exact up to eps(x_t, t) ~ eps(x_{t-1}, t); with a
    predictor that ignores x_t that holds exactly, so the round trip returns the input to float precision
    (1e-5 relative). Any misalignment of the inverse and forward timesteps breaks this by orders of
    magnitude, because eps varies with t. (A random-weight UNet is no smooth function of x_t: its round
    trip is off by ~100%, so it cannot stand in for a trained one here.)"""
    from datagen.editor import Pix2PixZero

    bb = make_backbone()
    bb.unet = TimeOnlyUNet(bb.unet)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    cond = bb.encode_text(["a cat", "a red square"])
    x_T = ddim_invert(bb, latents, cond, 20, None, gens(2))
    assert (x_T - latents).norm() > 0.5 * latents.norm()  # it really went somewhere
    editor = Pix2PixZero(bb, torch.zeros(1, 77, 32), resolution=64, num_inference_steps=20)
    reconstruction, _, _, _ = editor.lockstep(x_T, cond, cond, cond, xa_guidance=0.0)
    error = ((reconstruction - latents).norm() / latents.norm()).item()
    assert error < 1e-5, error
    editor.num_inference_steps = 19  # sampling on other timesteps than the inversion's: the test can fail
    shifted, _, _, _ = editor.lockstep(x_T, cond, cond, cond, xa_guidance=0.0)
    assert ((shifted - latents).norm() / latents.norm()).item() > 1e-2


class CorrelatedNoiseUNet(TimeOnlyUNet):
    """Predicts spatially correlated noise (unit variance, a new map per timestep): what the regularizer is for."""

    def __init__(self, unet):
        super().__init__(unet)
        self.table = torch.nn.Parameter(correlated((1000, 4, 32, 32), seed=1), requires_grad=False)

    def forward(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=self.table[t.long()].expand_as(x) + 0.1 * x)


def test_regularized_inversion_is_less_autocorrelated():
    """Measured: autocorrelation of x_T 0.169 without, 0.082 with the regularizer (10 steps)."""
    bb = make_backbone()
    bb.unet = CorrelatedNoiseUNet(bb.unet)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    cond = bb.encode_text(["a cat", "a dog"])
    plain = ddim_invert(bb, latents, cond, 10, None, gens(2))
    regular = ddim_invert(bb, latents, cond, 10, NoiseRegularizer(), gens(2))
    assert autocorrelation_loss(regular, gens(2, 9)) < 0.6 * autocorrelation_loss(plain, gens(2, 9))
