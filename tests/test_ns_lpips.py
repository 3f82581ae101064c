"""StyleDiffusion's NS-LPIPS: the soft mask, the inputs LPIPS is fed, the maps averaged, and evaluate.py's column."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from datagen.attention import Site
from distill.losses import build_lpips
from engine_fixtures import make_backbone
from evaluation.job import run
from evaluation.ns_lpips import NSLPIPS, WordMapAverage, background_masks, blend_token, masked_lpips, word_maps
from run_fixtures import CONF, write_run
from test_evaluate import evaluate_config

CROSS_UP = Site.of("up_blocks.1.attentions.0.transformer_blocks.0.attn2")


def official_mask(weights: torch.Tensor) -> torch.Tensor:
    """storemask.py + ns_lpips.py on one 2-D map: an RGB 8-bit picture of 255 * map / max, resized to 256 by PIL's
    default filter, saved as 255 - it, read back in [0, 1] and turned grey."""
    image = (255 * weights / weights.max()).unsqueeze(-1).expand(*weights.shape, 3).numpy().astype(np.uint8)
    background = 255 - np.asarray(Image.fromarray(image).resize((256, 256)))
    grey = np.asarray(Image.fromarray(background.astype(np.uint8)).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(grey @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def test_the_background_mask_is_the_official_soft_complement_of_the_scaled_map():
    maps = torch.zeros(2, 16, 16)
    maps[0, 4:8, 4:8] = 0.3  # a flat object: background 0 inside, 1 far from it, graded at its edge
    maps[1] = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) * 0.01
    masks = background_masks(maps)
    assert masks.shape == (2, 1, 256, 256)
    for mask, weights in zip(masks, maps):
        torch.testing.assert_close(mask[0], official_mask(weights), atol=1.5 / 255, rtol=0)
    assert masks[0, 0, 80:112, 80:112].max() <= 1 / 255 and masks[0, 0, :40, :40].min() == 1  # bicubic ringing: 1/255
    soft = ((masks > 0) & (masks < 1)).float().mean()
    assert soft > 0.05  # a binarised mask (the 0.5 threshold the official code overwrites) has none
    # the scale is the map's own maximum: the faint map is as strong a mask as the bright one
    assert masks[1].min() == 0 and masks[1].max() > 0.9


class RecordingLPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, first, second):
        self.seen += [first, second]
        return (first - second).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_sees_zero_one_images_at_256_px_times_the_mask():
    generator = torch.Generator().manual_seed(0)
    sources, edits = torch.rand(2, 2, 3, 64, 64, generator=generator) * 2 - 1
    masks = torch.rand(2, 1, 256, 256, generator=generator)
    stub = RecordingLPIPS()
    masked_lpips(stub, sources, edits, masks)
    first, second = stub.seen
    assert first.shape == (2, 3, 256, 256) and sources.min() < -0.9
    assert first.min() >= 0 and first.max() <= 1  # [0, 1], not LPIPS's normalize=True [-1, 1]
    upsampled = torch.nn.functional.interpolate((sources + 1) / 2, size=256, mode="bilinear", antialias=True).clamp(0, 1)
    torch.testing.assert_close(first, upsampled * masks)


def test_the_map_average_keeps_the_second_half_of_the_heads_and_each_rows_token():
    probs = torch.zeros(2, 8, 16, 77)  # (rows, heads, queries 4 x 4, keys)
    probs[:, :4, :, 5] = 1.0  # first half of the heads: on token 5
    probs[:, 4:, :, 5] = 0.25
    probs[1, 4:, :, 7] = 0.75  # row 1's second half also on token 7
    official = WordMapAverage(side=4, tokens=torch.tensor([5, 7]))
    assert official.reads(CROSS_UP, 16) and not official.reads(CROSS_UP, 64)
    assert not official.reads(Site.of("mid_block.attentions.0.transformer_blocks.0.attn2"), 16)
    assert not official.reads(Site.of("up_blocks.1.attentions.0.transformer_blocks.0.attn1"), 16)
    official(CROSS_UP, probs)
    everything = WordMapAverage(side=4, tokens=torch.tensor([5, 7]), all_heads=True)
    everything(CROSS_UP, probs)
    assert official.average.shape == (2, 4, 4)
    assert torch.equal(official.average[0], torch.full((4, 4), 0.25)) and torch.equal(official.average[1], torch.full((4, 4), 0.75))
    assert torch.equal(everything.average[0], torch.full((4, 4), 0.625)) and torch.equal(everything.average[1], torch.full((4, 4), 0.375))


@pytest.fixture(scope="module")
def backbone():
    return make_backbone()


def test_word_maps_over_an_inversion_on_the_tiny_unet(backbone):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).repeat(2, 1, 1, 1)
    prompts = ["a cat on a sofa", "a cat on a sofa"]
    cat, sofa = (blend_token(prompts[0], word, backbone.tokenizer) for word in ("cat", "sofa"))
    assert (cat, sofa) == (2, 5) and blend_token("a dog", "cat", backbone.tokenizer) == -1
    before = {name: type(processor) for name, processor in backbone.unet.attn_processors.items()}
    maps = word_maps(backbone, images, prompts, torch.tensor([cat, sofa]), num_steps=3)
    assert {name: type(processor) for name, processor in backbone.unet.attn_processors.items()} == before
    assert maps.shape == (2, 8, 8)  # the tiny UNet's coarsest cross-attention: 16 x 16 latents / 2
    assert (maps > 0).all() and (maps < 1).all()
    assert not torch.allclose(maps[0], maps[1])  # each row its own token
    again = word_maps(backbone, images[:1], prompts[:1], torch.tensor([sofa]), num_steps=3)
    torch.testing.assert_close(again[0], maps[1], atol=1e-6, rtol=1e-5)  # rows do not mix


def test_ns_lpips_ignores_the_object_counts_the_background_and_skips_a_prompt_without_the_word(backbone):
    lpips = build_lpips(pretrained=False, net="alex")
    metric = NSLPIPS(backbone, lpips, num_steps=3)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    masks = torch.ones(3, 1, 256, 256)
    masks[:, :, 64:192, 64:192] = 0  # the object
    object_only, background_too = inputs.clone(), inputs.clone()
    object_only[:, :, 10:22, 10:22] = 1  # inside the object (32 px -> 256 px: 80 to 176)
    background_too[:, :, :4] = 1
    found = torch.tensor([True, True, False])
    assert torch.equal(metric.score(inputs, object_only, (masks, found))[:2], torch.zeros(2))
    values = metric.score(inputs, background_too, (masks, found))
    assert (values[:2] > 1e-3).all() and values[2].isnan()  # the random AlexNet trunk gives small values
    backgrounds, found = metric.backgrounds(inputs, ["a cat", "a cat on grass", "a dog"], ["cat", "cat", "cat"])
    assert backgrounds.shape == (3, 1, 256, 256) and found.tolist() == [True, True, False]


def test_evaluate_reports_ns_lpips_for_teacher_and_student_when_asked(tmp_path):
    keys = write_run(tmp_path / "run", [{"seg_iou": 0.9, "clip_gain": 0.2}], resolution=32)
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    config.model = OmegaConf.merge({k: v for k, v in OmegaConf.load(CONF / "model" / "tiny.yaml").items() if k != "defaults"},
                                   config.model)
    OmegaConf.save(config, tmp_path / "run" / "config.yaml")
    from test_evaluate import scripted_student

    student = scripted_student(tmp_path / "generator.ts")
    [report] = run(evaluate_config(tmp_path, f"student={student}", "batch_size=4", "cases=1", "ns_lpips=true"))
    document = json.loads((report.parent / "report.json").read_text())
    ns = document["metrics"]["ns_lpips"]
    assert set(ns) == {"teacher", "student"} and all(value > 0 for value in ns.values())
    rows = [json.loads(line) for line in (report.parent / "pairs.jsonl").read_text().splitlines()]
    assert [row["key"] for row in rows] == keys and all(np.isfinite(row["teacher"]["ns_lpips"]) for row in rows)
    assert any(line.startswith("| NS-LPIPS") for line in report.read_text().splitlines())
