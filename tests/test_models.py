"""Co-Mod-GAN generator and conditional discriminator (models/): exact layer maths, shapes, the
documented parameter formula, gradients, determinism, TorchScript parity and a learning step."""
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from models.comodgan import Generator
from models.discriminator import Discriminator
from models.layers import Conv2d, MinibatchStd, ModulatedConv2d, Upsample, fir_kernel

CONF_DIR = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")
TINY = dict(channel_base=2048, channel_max=32, z_dim=16, w_dim=16, code_dim=32, mapping_layers=2)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny convolutions on a busy 2-core machine run ~50x faster on one thread (no OpenMP spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_generator(resolution: int = 32, **kwargs) -> Generator:
    torch.manual_seed(0)
    return Generator(resolution, **{**TINY, **kwargs})


def tiny_discriminator(resolution: int = 32) -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(resolution, channel_base=2048, channel_max=32)


def images(batch: int, resolution: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------------- layers


def test_downsampling_conv_equals_filter_then_strided_conv():
    """The composed (k+3)x(k+3) kernel reproduces StyleGAN2's two-step downsampling exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 8)
    for k in (3, 1):
        conv = Conv2d(5, 7, k, down=True, activation=False)
        filtered = F.conv2d(x, fir_kernel(5), padding=k // 2 + 1, groups=5)
        reference = F.conv2d(filtered, conv.weight * conv.weight_gain, conv.bias, stride=2)
        assert reference.shape == (2, 7, 4, 4)
        torch.testing.assert_close(conv(x), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grouped", [False, True])
def test_upsampling_modulated_conv_equals_stylegan2_reference(grouped):
    """Per sample: scale inputs by the style, stride-2 transposed 3x3 conv, demodulate, then the
    FIR filter with gain 4 and padding 1, then bias."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, style_dim=4, up=True, grouped=grouped)
    conv.bias.data.normal_()
    x, style = torch.randn(2, 5, 8, 8), torch.randn(2, 4)
    s = conv.affine(style)
    weight = conv.weight * conv.weight_gain
    expected = []
    for b in range(2):
        w = weight * s[b][None, :, None, None]
        w = w * torch.rsqrt(w.square().sum([1, 2, 3], keepdim=True) + 1e-8)
        y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)
        expected.append(F.conv2d(y, fir_kernel(7, gain=4.0), padding=1, groups=7) + conv.bias[None, :, None, None])
    torch.testing.assert_close(conv(x, style), torch.cat(expected), atol=1e-5, rtol=0)


def test_demodulation_cancels_the_scale_of_the_style():
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 4, 3, style_dim=5)
    x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 5)
    before = conv(x, style)
    with torch.no_grad():
        conv.affine.weight.mul_(3.0)
        conv.affine.bias.mul_(3.0)
    torch.testing.assert_close(conv(x, style), before, atol=1e-5, rtol=0)


def test_upsample_is_the_binomial_filter_and_keeps_constants():
    up = Upsample(1)
    delta = torch.zeros(1, 1, 5, 5)
    delta[0, 0, 2, 2] = 1.0
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 4  # 1D: [1, 3, 3, 1] / 8 with gain 2
    expected = torch.zeros(1, 1, 10, 10)
    expected[0, 0, 3:7, 3:7] = torch.outer(taps, taps)
    torch.testing.assert_close(up(delta), expected)
    out = up(torch.full((1, 1, 6, 6), 0.5))
    torch.testing.assert_close(out[..., 1:-1, 1:-1], torch.full((1, 1, 10, 10), 0.5))


def test_minibatch_std_exact_values():
    # Batch 4, group 2: samples {0, 2} and {1, 3} form the groups (n % (4 // 2)).
    x = torch.zeros(4, 2, 2, 2)
    x[2] = 2.0          # group {0, 2}: std 1 everywhere
    x[3, 0] = 4.0       # group {1, 3}: std 2 in channel 0, 0 in channel 1 -> mean 1 (+ eps)
    x[3, 1] = 0.0
    out = MinibatchStd(group_size=2)(x)
    assert out.shape == (4, 3, 2, 2)
    torch.testing.assert_close(out[:, :2], x)
    torch.testing.assert_close(out[:, 2], torch.ones(4, 2, 2), atol=1e-4, rtol=0)
    # A batch of 6 with group 4 uses groups of gcd(6, 4) = 2 instead of failing.
    assert MinibatchStd(group_size=4)(torch.randn(6, 2, 4, 4)).shape == (6, 3, 4, 4)


# ------------------------------------------------------------------------- whole networks


@pytest.mark.parametrize("resolution", [64, 128, 256, 512])
def test_output_shapes(resolution):
    G, D = tiny_generator(resolution).eval(), tiny_discriminator(resolution)
    x = images(2, resolution)
    with torch.no_grad():
        y = G(x)
        assert y.shape == x.shape
        assert y.abs().max() <= 1.0
        assert D(x, y).shape == (2, 1)


def expected_generator_parameters(resolution, channel_base=32768, channel_max=512, z_dim=512, w_dim=512,
                                  code_dim=1024, mapping_layers=8, img_channels=3):
    """The formula documented in models/comodgan.py."""
    C = lambda r: min(channel_base // r, channel_max)
    S, D, c = w_dim + code_dim, code_dim, img_channels
    rs = [8 << i for i in range(resolution.bit_length() - 3)]  # 8, ..., R
    mod = lambda i, o: 9 * i * o + o + S * i + i + 1
    rgb = lambda i: c * i + c + S * i + i
    mapping = z_dim * w_dim + w_dim + (mapping_layers - 1) * (w_dim ** 2 + w_dim)
    encoder = (c * C(resolution) + C(resolution)
               + sum(9 * C(r) ** 2 + C(r) + 9 * C(r) * C(r // 2) + C(r // 2) for r in rs)
               + 9 * C(4) ** 2 + C(4) + 16 * C(4) * D + D)
    decoder = (16 * C(4) * D + 16 * C(4) + mod(C(4), C(4)) + rgb(C(4))
               + sum(mod(C(r // 2), C(r)) + mod(C(r), C(r)) + rgb(C(r)) for r in rs))
    return mapping + encoder + decoder


def expected_discriminator_parameters(resolution, channel_base=32768, channel_max=512, img_channels=3):
    """The formula documented in models/discriminator.py."""
    C = lambda r: min(channel_base // r, channel_max)
    rs = [8 << i for i in range(resolution.bit_length() - 3)]  # 8, ..., R
    return (2 * img_channels * C(resolution) + C(resolution)
            + sum(9 * C(r) ** 2 + C(r) + 9 * C(r) * C(r // 2) + C(r // 2) + C(r) * C(r // 2) for r in rs)
            + 9 * (C(4) + 1) * C(4) + C(4) + 16 * C(4) ** 2 + C(4) + C(4) + 1)


@pytest.mark.parametrize("preset", ["comodgan_256", "comodgan_512", "small"])
def test_parameter_counts_match_documented_formula(preset):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(overrides=[f"+generator={preset}", f"+discriminator={preset}"])
    with torch.device("meta"):  # counts without allocating 80 M weights
        G, D = instantiate(cfg.generator), instantiate(cfg.discriminator)
    g_args = {k: v for k, v in cfg.generator.items() if k not in ("_target_", "dropout", "w_avg_beta", "grouped_modconv")}
    d_args = {k: v for k, v in cfg.discriminator.items() if k not in ("_target_", "mbstd_group")}
    print(f"{preset}: G {G.num_parameters():,} parameters, D {D.num_parameters():,} parameters")
    assert G.num_parameters() == expected_generator_parameters(**g_args)
    assert D.num_parameters() == expected_discriminator_parameters(**d_args)
    if preset == "comodgan_512":
        assert (G.num_parameters(), D.num_parameters()) == (79_792_167, 28_983_041)


def test_gradients_reach_every_parameter():
    G, D = tiny_generator(16).train(), tiny_discriminator(16)
    x = images(4, 16)
    y = G(x)
    weights = torch.randn_like(y)  # a generic loss: no symmetry can cancel a gradient
    ((y * weights).sum() + D(x, y).sum()).backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_is_deterministic_and_training_noise_is_not():
    G = tiny_generator(16, dropout=0.0)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
        x, z = images(2, 16), torch.randn(2, TINY["z_dim"])
        G.train()
        assert not torch.allclose(G(x, z), G(x, z))   # same z, no dropout: only the noise differs
        G.eval()
        assert torch.equal(G(x), G(x))
        assert torch.equal(G(x, z), G(x, z))
        assert not torch.allclose(G(x), G(x, z))      # eval without z uses w_avg, not z


def test_training_tracks_w_avg_for_eval():
    """w_avg is StyleGAN's running mean of the mapped latents: from 0, each training forward moves it a share
    1 - beta of the way to its batch's mean w (beta 0.75 here, so that a wrong direction or share shows); eval
    forwards, with or without z, leave it, and without z eval styles every sample with it."""
    G = tiny_generator(16, w_avg_beta=0.75).train()
    assert torch.count_nonzero(G.w_avg) == 0
    x, (z1, z2) = images(2, 16), torch.randn(2, 2, TINY["z_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        G(x, z1), G(x, z2)
        w1, w2 = G.mapping(z1).mean(0), G.mapping(z2).mean(0)
        torch.testing.assert_close(G.w_avg, 0.75 * (0.25 * w1) + 0.25 * w2)
        tracked = G.w_avg.clone()
        G.eval()
        G(x, z1)
        skips, code = G.encoder(x)
        styled = G.decoder(code, skips, torch.cat([tracked.expand(len(x), -1), code], dim=1)).clamp(-1, 1)
        torch.testing.assert_close(G(x), styled, atol=0, rtol=0)
    assert torch.equal(G.w_avg, tracked)


def test_torchscript_matches_eager():
    G = tiny_generator(32).eval()
    scripted = torch.jit.script(G)
    x = images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), G(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(scripted(x.contiguous(memory_format=torch.channels_last)), G(x), atol=1e-5, rtol=0)


def test_grouped_and_activation_modulation_compute_the_same_generator():
    G = tiny_generator(32).eval()
    G_grouped = tiny_generator(32, grouped_modconv=True).eval()
    G_grouped.load_state_dict(G.state_dict())
    x = images(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(G_grouped(x), G(x), atol=1e-5, rtol=0)


def test_channels_last_and_bf16_autocast_run():
    G = tiny_generator(32).eval()
    x = images(2, 32)
    with torch.no_grad():
        reference = G(x)
        G_cl = tiny_generator(32).eval().to(memory_format=torch.channels_last)
        torch.testing.assert_close(G_cl(x.contiguous(memory_format=torch.channels_last)), reference, atol=1e-5, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = G(x)
        assert torch.isfinite(low).all() and (low.float() - reference).abs().mean() < 0.05


def test_one_step_lowers_l1_on_a_fixed_pair():
    G = tiny_generator(16).train()
    x, target = images(2, 16, seed=1), images(2, 16, seed=2)
    optimizer = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.99))

    def l1() -> torch.Tensor:
        torch.manual_seed(7)  # same z, noise and dropout mask: the loss depends on the weights only
        return (G(x) - target).abs().mean()

    before = l1()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = l1()
    assert after < before - 1e-3


def test_wrong_input_size_is_a_readable_error():
    with pytest.raises(ValueError, match="expects 32x32 images, got 16x16"):
        tiny_generator(32)(images(1, 16))
    with pytest.raises(ValueError, match="power of two"):
        Generator(48)
