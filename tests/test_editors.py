"""pix2pix-zero's direct inversion keeps its reference on the inversion trajectory."""
import torch

from datagen.editors.pix2pix_zero import Pix2PixZero
from engine_fixtures import RESOLUTION, make_backbone, random_direction


def test_pix2pix_zero_direct_inversion_puts_the_reference_back_on_the_inversion_trajectory():
    """The reference pass ends on the image's own latents (float precision); without the offsets it does not."""
    backbone = make_backbone()
    editor = Pix2PixZero(backbone, random_direction(backbone), RESOLUTION, num_inference_steps=3, num_inversion_steps=3,
                         inversion="direct")
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    latents = backbone.encode_images(images * 2 - 1)
    cond = backbone.encode_text(["a cat", "a cat on a bed"])
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    inversion = editor.inverter(backbone, latents, cond, cond, 3, 1.0, generators)
    reference, edited, _, _ = editor.lockstep(inversion.x_T, None, cond, cond + editor.direction, 0.1, inversion.offsets)
    plain_reference, plain_edited, _, _ = editor.lockstep(inversion.x_T, None, cond, cond + editor.direction, 0.1)
    assert (reference - latents).abs().max() < 1e-4  # explicit vs fused attention in the reference pass: ~1e-5
    assert (plain_reference - latents).abs().max() > 1e-2  # the offsets do the work
    assert (edited - plain_edited).abs().max() > 1e-3  # and, as PnP-Inversion's pix2pix-zero, also move the edit
