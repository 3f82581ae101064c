"""PIE-Bench: the mapping file and its RLE masks read exactly, its metrics' conventions pinned on constructed images,
and the benchmark run on a small folder in PIE-Bench's format written from toy-world renders."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn
from torchmetrics.functional.image.lpips import _LPIPS

from evaluation.editor_benchmark import EditorBenchmark
from evaluation.metrics import KeySelfSimilarity
from evaluation.pie_bench import (IMAGES, MAPPING_FILE, PieBenchMetrics, eight_bit, load_image, mask_decode, mask_encode,
                                  pie_bench_set, read_mapping, scaled_inputs, squeeze_lpips)
from filters.clip_gain import ClipEncoder
from filters.loading import MissingModelError
from filters.score import load_model
from toyworld.render import render
from toyworld.world import captions, sample_scenes

CONF = Path(__file__).resolve().parent.parent / "conf"


def test_mask_decode_follows_the_official_decoder():
    """(start, length) runs over the row-major image, a run cut at the end, then the border forced to 1."""
    mask = mask_decode([6, 2, 17, 10], shape=(4, 5))  # pixels 6, 7 and 17, 18, 19 (the second run is cut)
    expected = np.zeros((4, 5), bool)
    expected.ravel()[[6, 7, 17, 18, 19]] = True
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = True
    assert (mask == expected).all()
    empty = mask_decode([], shape=(4, 5))
    assert empty.sum() == 5 + 5 + 2 + 2 and not empty[1:-1, 1:-1].any()  # the border alone


def test_masks_round_trip_through_the_rle():
    rng = np.random.default_rng(0)
    mask = rng.random((512, 512)) < 0.3
    mask[100:300, 50:400] = True
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True  # the decoder forces the border: a round trip keeps it
    encoded = mask_encode(mask)
    assert (mask_decode(encoded) == mask).all()
    assert len(encoded) % 2 == 0 and encoded[:2] == [0, int(np.argmin(mask.ravel()))]  # the first run: row 0 and on


def write_pie_folder(root: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Three toy renders as 512 x 512 PIE-Bench images (each pixel a 16 x 16 block) with their object masks as RLE,
    bracketed prompts and blended words (one entry without). Returns the renders, their masks and the entries."""
    scenes = sample_scenes(3, 11, size=size, two_object_prob=0.0, held_out="any")
    images, masks = render(scenes)
    regions = masks[:, 0] > 0
    texts = captions(scenes)
    factor = 512 // size
    entries = {}
    for i in range(3):
        path = f"{i}_artificial/{i:012d}.jpg".replace(".jpg", ".png")  # PNG: lossless, so the test can be exact
        (root / IMAGES / path).parent.mkdir(parents=True, exist_ok=True)
        pixels = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(factor, 0).repeat(factor, 1)
        Image.fromarray(pixels).save(root / IMAGES / path)
        words = texts[i].split()
        shape = next(w for w in words if w in ("circle", "square", "triangle", "star"))
        entries[f"{i:012d}"] = {
            "image_path": path,
            "original_prompt": texts[i].replace(shape, f"[{shape}]"),
            "editing_prompt": texts[i].replace(shape, "[square]" if shape != "square" else "[circle]"),
            "editing_instruction": "Change the shape",
            "editing_type_id": str(1 + i % 2),
            "blended_word": "" if i == 2 else f"{shape} {'square' if shape != 'square' else 'circle'}",
            "mask": mask_encode(regions[i].numpy().repeat(factor, 0).repeat(factor, 1)),
        }
    (root / MAPPING_FILE).write_text(json.dumps(entries))
    return images, regions, list(entries.values())


def with_border(masks: torch.Tensor) -> torch.Tensor:
    masks = masks.clone()
    masks[:, 0, :] = masks[:, -1, :] = masks[:, :, 0] = masks[:, :, -1] = True
    return masks


def test_mapping_file_reads_prompts_words_types_and_masks_exactly(tmp_path):
    images, regions, raw = write_pie_folder(tmp_path)
    entries = read_mapping(tmp_path)
    assert [e.key for e in entries] == ["000000000000", "000000000001", "000000000002"]
    for entry, item in zip(entries, raw):
        assert entry.source_prompt == item["original_prompt"].replace("[", "").replace("]", "")
        assert "[" not in entry.target_prompt and entry.target_prompt == item["editing_prompt"].replace("[", "").replace("]", "")
        assert entry.editing_type == int(item["editing_type_id"]) and entry.instruction == "Change the shape"
    assert entries[0].blended_words == tuple(raw[0]["blended_word"].split()) and entries[2].blended_words is None
    assert [e.key for e in read_mapping(tmp_path, editing_types=[2])] == ["000000000001"]
    assert len(read_mapping(tmp_path, limit=2)) == 2

    pie = pie_bench_set(tmp_path, size=32)
    assert torch.equal(pie.edit_masks, with_border(regions))  # 512 x 512 RLE -> 32 x 32, the border forced again
    # each 16 x 16 block back to its pixel: float32 box means of 256 equal values round by ~1e-6; a level is 4e-3
    assert (pie.images - eight_bit(images)).abs().max() < 1e-5
    assert pie.words[2] is None and pie.seeds == [1234] * 3


class AxisClip(ClipEncoder):
    """A CLIP whose image feature is the mean colour and whose texts are colour axes: known cosines."""

    AXES = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "cyan": [0.0, -1.0, -1.0]}

    def __init__(self):
        super().__init__(nn.Identity(), logit_scale=100.0)
        self.anchor = nn.Parameter(torch.zeros(1))  # the wrapper reads its device from a parameter

    def image_features(self, pixels):
        return pixels.mean((2, 3)) + self.anchor

    def text_features(self, texts):
        return torch.tensor([self.AXES[text] for text in texts])


SIDE = 32  # the smallest side LPIPS' SqueezeNet trunk takes (its third max-pool needs a 3 x 3 map)


@pytest.fixture(scope="module")
def metrics():
    return PieBenchMetrics(AxisClip(), KeySelfSimilarity.tiny(seed=0, image_size=16), squeeze_lpips(pretrained_trunk=False))


def grey(level: int) -> torch.Tensor:
    """1 x 3 x SIDE x SIDE of one 8-bit level."""
    return torch.full((1, 3, SIDE, SIDE), level / 255)


def region(batch: int = 1) -> torch.Tensor:
    """B x SIDE x SIDE bool, no pixel set."""
    return torch.zeros(batch, SIDE, SIDE, dtype=torch.bool)


def test_images_larger_than_the_mask_frame_shrink_by_box_filter(tmp_path):
    """512 px, black but for the first pixel of every 16 x 16 block: at 32 px each pixel is the mean of the block it
    covers, 1/256 (nearest or bilinear sampling reads the block's middle: 0)."""
    dots = np.zeros((512, 512, 3), np.uint8)
    dots[::16, ::16] = 255
    Image.fromarray(dots).save(tmp_path / "dots.png")
    image = load_image(tmp_path / "dots.png", 32)
    assert image.shape == (3, 32, 32) and (image - 1 / 256).abs().max() < 1e-7


def test_identical_images_give_infinite_psnr_zero_mse_and_lpips_unit_ssim(metrics):
    image = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    mask = region(2)
    mask[:, 4:8, 4:8] = True
    values = metrics(image, image, mask, ["red", "red"], ["green", "green"])
    assert math.isinf(values["bg_psnr"][0]) and values["bg_mse"].tolist() == [0.0, 0.0]
    assert values["bg_ssim"].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert values["structure"].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    assert values["bg_lpips"].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_background_metrics_multiply_both_images_by_the_mask_and_average_over_the_whole_image(metrics):
    """Background: 32 x 32 with a 4 x 4 edit region. The edit differs by 50 levels on 8 background pixels: multiplied
    and averaged over all 1024 pixels, MSE = 8 (50/255)^2 / 1024 (a mean over the 1008 background pixels would be
    1.6 % larger, beyond the bound)."""
    source, edited = grey(100), grey(100).clone()
    edited[..., 0, :8] = 150 / 255
    mask = region()
    mask[:, 6:10, 6:10] = True
    values = metrics(source, edited, mask, ["red"], ["green"])
    mse = 8 * (50 / 255) ** 2 / (SIDE * SIDE)
    assert values["bg_mse"].item() == pytest.approx(mse, rel=1e-5)
    assert values["bg_psnr"].item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)

    inside = edited.clone()
    inside[..., 6:10, 6:10] = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))  # only in the region
    changed = metrics(source, inside, mask, ["red"], ["green"])
    for name in ("bg_mse", "bg_psnr", "bg_ssim", "bg_lpips"):
        assert changed[name].item() == pytest.approx(values[name].item(), rel=1e-5, abs=1e-7), name
    assert changed["clip_edited"].item() != pytest.approx(values["clip_edited"].item())  # the edited region's score does see it


def test_an_empty_region_gives_nan(metrics):
    image = grey(90)
    everything, nothing = ~region(), region()
    no_background = metrics(image, grey(120), everything, ["red"], ["green"])
    assert all(math.isnan(no_background[name].item()) for name in ("bg_psnr", "bg_lpips", "bg_mse", "bg_ssim"))
    assert math.isnan(metrics(image, grey(120), nothing, ["red"], ["green"])["clip_edited"].item())
    assert not math.isnan(no_background["clip_edited"].item())


def test_clip_score_is_100_times_the_cosine_clamped_at_zero(metrics):
    """The upper half (0.6, 0.8, 0), the lower half (1, 0, 0), against the colour axes. Whole image: mean (0.8, 0.4, 0),
    100 cos = 89.44 (red), 44.72 (green), -22.36 -> 0 (cyan). The edited region (the upper half) times the image:
    mean (0.3, 0.4, 0), the upper half's direction: 60, 80, -56.6 -> 0."""
    image = torch.zeros(3, 3, SIDE, SIDE)
    image[:, :, : SIDE // 2] = torch.tensor([153, 204, 0]).view(1, 3, 1, 1) / 255
    image[:, 0, SIDE // 2 :] = 1.0
    mask = region(3)
    mask[:, : SIDE // 2] = True
    texts = ["red", "green", "cyan"]
    values = metrics(image, image, mask, texts, texts)
    assert values["clip_whole"].tolist() == pytest.approx([89.443, 44.721, 0.0], abs=1e-3)
    assert values["clip_source"].tolist() == pytest.approx([89.443, 44.721, 0.0], abs=1e-3)
    assert values["clip_edited"].tolist() == pytest.approx([60.0, 80.0, 0.0], abs=1e-3)


def test_images_are_compared_as_8_bit_pictures(metrics):
    """Less than half a level apart: the same picture once written to a file."""
    assert eight_bit(torch.tensor([0.5, 0.0, 1.2])).tolist() == pytest.approx([128 / 255, 0.0, 1.0])
    nudged = grey(100) + 0.4 / 255
    assert math.isinf(metrics(grey(100), nudged, region(), ["red"], ["red"])["bg_psnr"].item())
    assert not math.isinf(metrics(grey(100), grey(100) + 0.6 / 255, region(), ["red"], ["red"])["bg_psnr"].item())


def test_lpips_is_torchmetrics_squeeze_net_on_images_scaled_to_minus_one_one(metrics):
    """torchmetrics' LPIPS(net_type='squeeze') with our (random, offline) trunk copied in gives the same values on the
    background-masked images in [-1, 1]: the net, the linear heads and the scaling are PIE-Bench's."""
    reference = _LPIPS(pretrained=True, net="squeeze", pnet_rand=True).eval()
    with torch.no_grad():
        for theirs, ours in zip(reference.net.parameters(), metrics.lpips.net.parameters(), strict=True):
            theirs.copy_(ours)
    generator = torch.Generator().manual_seed(2)
    source, edited = (eight_bit(torch.rand(2, 3, SIDE, SIDE, generator=generator)) for _ in range(2))
    mask = region(2)
    mask[:, 3:19, 2:17] = True
    background = (~mask)[:, None].float()
    with torch.no_grad():
        expected = reference(source * background * 2 - 1, edited * background * 2 - 1).flatten()
    assert metrics(source, edited, mask, ["red"] * 2, ["red"] * 2)["bg_lpips"].tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_structure_distance_feeds_the_vit_0_to_255_pixels():
    """The real preset's DINO sees 255 x the [0, 1] image before its resize and ImageNet normalisation."""
    vit = KeySelfSimilarity.tiny(seed=0, image_size=16)
    base = vit.preprocess
    scaled = scaled_inputs(KeySelfSimilarity.tiny(seed=0, image_size=16), 255.0)
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(scaled.preprocess(pixels), base(255 * pixels))


def test_the_real_preset_names_pie_benchs_models_and_says_when_they_are_missing():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=["model=sd14"])
    real = cfg.pie_metrics.sd14
    assert real.clip.name_or_path == "openai/clip-vit-large-patch14"
    assert (real.structure.name_or_path, real.structure.image_size, real.structure.pixel_scale) == ("facebook/dino-vitb8", 224, 255.0)
    assert real.lpips_pretrained_trunk is True
    for model in (real.clip, real.structure):  # offline (conftest): one readable line each, naming the model
        with pytest.raises(MissingModelError, match=model.name_or_path):
            load_model(model)


def test_the_benchmark_runs_on_a_pie_bench_folder(tmp_path):
    """model=toy on the folder: one set, no ground truth, PIE-Bench's and the paper's metrics for every row."""
    write_pie_folder(tmp_path / "data")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=[
            "benchmark/preset=smoke", "benchmark/source=pie_bench", f"source.path={tmp_path / 'data'}", "~editors.sdedit",
            f"out={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}"])
        result = EditorBenchmark(cfg).run()
    (pie,) = result.sets
    assert pie.set.name == "pie_bench" and len(pie.set) == 3 and pie.set.truth is None
    assert [row.name for row in pie.rows] == ["input_vae", "pix2pix_zero"]
    for row in pie.rows:
        assert not any(name.startswith(("gt_", "filter_")) for name in row.columns)
        for name in ("pie_structure", "pie_bg_psnr", "pie_bg_lpips", "pie_bg_mse", "pie_bg_ssim", "pie_clip_whole",
                     "pie_clip_edited", "paper_clip_margin", "paper_structure_dist", "paper_bg_lpips"):
            assert len(row.columns[name]) == 3 and all(math.isfinite(v) for v in row.columns[name]), (row.name, name)
