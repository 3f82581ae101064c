from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from datagen.inversions.ddim import (NoiseRegularizer, PyramidRolls, autocorrelation_grad, autocorrelation_loss, ddim_invert,
                               draw_shifts, kl_grad, kl_loss)
from engine_fixtures import TimeOnlyUNet, make_backbone


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def ac_loss(x, generators):
    """The autocorrelation loss at one draw of offsets from `generators`."""
    shifts = draw_shifts(generators, x.shape[1], x.shape[3], rounds=1)[0]
    return autocorrelation_loss(x, PyramidRolls.of(shifts, x.shape[2], x.shape[3]))


def correlated(shape, seed=0):
    """Gaussian noise blurred 5x5 and renormalised: unit variance, strong spatial correlation."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="circular"), 5, stride=1)
    return (x - x.mean()) / x.std()


def test_regularizer_small_on_white_large_on_correlated_noise():
    white = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    blurred = correlated((2, 4, 64, 64))
    assert ac_loss(white, gens(2)) < 0.01
    assert ac_loss(blurred, gens(2)) > 10 * ac_loss(white, gens(2))
    assert abs(kl_loss(white).item()) < 0.01
    assert kl_loss(3 * white + 1).item() > 10


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.0])
def test_regularizer_steps_move_noise_toward_white(scale):
    """Default strength (5 x (5 AC steps + 1 KL step), lambda 20): measured AC 1.42 -> 0.82 at unit scale,
    KL 1.50 -> 0.92 at scale 0.3 and 1.61 -> 0.43 at scale 2."""
    noise = scale * correlated((1, 4, 32, 32))
    after = NoiseRegularizer()(noise, gens(1))
    objective = lambda x: ac_loss(x, gens(1, 5)) + kl_loss(x)  # noqa: E731
    assert objective(after) < 0.7 * objective(noise)


def test_either_term_can_be_switched_off():
    """Measured: KL 6.80 -> 6.05 with the KL steps alone, AC 189 -> 11.6 with the autocorrelation steps alone."""
    noise = 3 * correlated((1, 4, 32, 32)) + 1
    kl_only, ac_only = NoiseRegularizer(lambda_ac=0)(noise, gens(1)), NoiseRegularizer(lambda_kl=0)(noise, gens(1))
    assert kl_loss(kl_only) < 0.95 * kl_loss(noise) and ac_loss(ac_only, gens(1, 5)) < 0.5 * ac_loss(noise, gens(1, 5))
    assert torch.equal(NoiseRegularizer(lambda_ac=0, lambda_kl=0)(noise, gens(1)), noise)


def test_shifts_never_zero():
    """d = 0 would penalise the variance instead of the correlation (a bug of an early official version). The drawn
    offsets cover [1, w/2) at every pyramid level and never 0; on white noise the loss at them is that of true
    correlations (measured at most 0.016), where d = 0 gives each map's mean square, ~1 per map and direction (measured 34)."""
    shifts = draw_shifts(gens(4), 4, 64, rounds=50)  # rounds x levels (64, 32, 16, 8) x samples x channels: 800 a level
    for level, width in enumerate((64, 32, 16, 8)):
        assert shifts[:, level].unique().tolist() == list(range(1, width // 2)), level
    white = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    rolls = PyramidRolls.of(shifts, 64, 64)
    assert max(autocorrelation_loss(white, rolls[r]) for r in range(50)) < 0.05
    at_zero = PyramidRolls.of(torch.zeros_like(shifts[0]), 64, 64)  # the bug, as a control: the same loss fails
    assert autocorrelation_loss(white, at_zero) > 20


@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (3, 4, 24, 40), (1, 2, 27, 27)])
def test_written_out_gradients_equal_autograd(shape):
    """The regularizer steps on autocorrelation_grad and kl_grad, not autograd: every pyramid level, both
    directions, non-square maps and pooling that drops an odd row (27 -> 13 -> 6) included."""
    x = correlated(shape)
    shifts = draw_shifts(gens(shape[0]), shape[1], shape[3], rounds=3)
    for rolls in (PyramidRolls.of(shifts, *shape[2:])[r] for r in range(3)):
        leaf = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(autocorrelation_loss(leaf, rolls) + 20 * kl_loss(leaf), leaf)
        torch.testing.assert_close(autocorrelation_grad(x, rolls) + 20 * kl_grad(x), expected, rtol=1e-4, atol=1e-7)


def test_offsets_are_each_samples_own():
    """A sample draws the same offsets alone or in a batch, from its own generator; rounds differ."""
    together = draw_shifts(gens(3), 4, 64, rounds=2)  # rounds x levels (64, 32, 16, 8) x samples x channels
    assert together.shape == (2, 4, 3, 4)
    assert torch.equal(draw_shifts(gens(1, 2), 4, 64, rounds=2)[:, :, 0], together[:, :, 2])
    assert not torch.equal(together[0], together[1])
    assert all(1 <= together[:, level].min() and together[:, level].max() < width // 2
               for level, width in enumerate((64, 32, 16, 8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_regularizer_never_waits_for_the_gpu():
    """No host-device synchronisation inside a call: the GPU runs the UNet while the host queues the regularizer."""
    noise = correlated((4, 4, 64, 64)).cuda()
    NoiseRegularizer()(noise, gens(4))  # the first pinned allocation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        NoiseRegularizer()(noise, gens(4))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_inversion_then_reconstruction_returns_the_input():
    """No regularization, no guidance. DDIM inversion is exact up to eps(x_t, t) ~ eps(x_{t-1}, t); with a
    predictor that ignores x_t that holds exactly, so the round trip returns the input to float precision
    (1e-5 relative). Any misalignment of the inverse and forward timesteps breaks this by orders of
    magnitude, because eps varies with t. (A random-weight UNet is no smooth function of x_t: its round
    trip is off by ~100%, so it cannot stand in for a trained one here.)"""
    from datagen.editors.pix2pix_zero import Pix2PixZero

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
    assert ac_loss(regular, gens(2, 9)) < 0.6 * ac_loss(plain, gens(2, 9))
