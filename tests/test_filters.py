"""Scorers: exact IoU on drawn masks, the CLIP formulas on hand-made features, tiny models end to end."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from filters.clip_gain import OpenClipEncoder, TransformersClipEncoder, clip_scores
from filters.loading import MissingModelError
from filters.score import PairScorer, build_scorer, segmentation_words
from filters.segmentation import ClipSegSegmenter, SegmentationScorer, mask_iou
from filters.thresholds import judge

CONF = Path(__file__).parents[1] / "conf"
DOCUMENTED_SCORES = {
    "seg_iou", "seg_area_input", "seg_area_edited", "clip_gain", "clip_direction", "clip_image",
    "clip_input_source", "clip_input_target", "clip_edited_source", "clip_edited_target",
}  # fmt: skip


def drawn_mask(draw) -> torch.Tensor:
    image = Image.new("1", (20, 20))
    draw(ImageDraw.Draw(image))
    return torch.from_numpy(np.array(image))


def test_mask_iou_on_drawn_shapes_is_exact():
    square = drawn_mask(lambda d: d.rectangle((0, 0, 9, 9), fill=1))  # 100 pixels
    shifted = drawn_mask(lambda d: d.rectangle((5, 5, 14, 14), fill=1))  # overlaps in 5 x 5
    inside = drawn_mask(lambda d: d.rectangle((2, 2, 5, 5), fill=1))  # 16 pixels within the square
    far = drawn_mask(lambda d: d.rectangle((15, 15, 19, 19), fill=1))
    empty = drawn_mask(lambda d: None)
    a = torch.stack([square, square, square, square, empty, empty])
    b = torch.stack([square, shifted, inside, far, square, empty])
    iou = mask_iou(a, b)
    torch.testing.assert_close(iou[:5], torch.tensor([1.0, 25 / 175, 16 / 100, 0.0, 0.0]))  # float32-exact
    assert math.isnan(iou[5])


class ChannelSegmenter:
    """Stands in for CLIPSeg: 'finds' any word where the red channel is bright, and records the prompts."""

    def __init__(self):
        self.prompts = []

    def masks(self, images, prompts):
        self.prompts.append(prompts)
        return images[:, 0] > 0.5


def test_segmentation_scorer_masks_source_word_in_input_and_target_word_in_edited():
    inputs, edited = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    inputs[0, 0, :4, :4] = 1  # 16 pixels
    edited[0, 0, :4, :2] = 1  # 8 of them
    segmenter = ChannelSegmenter()
    scorer = SegmentationScorer(segmenter, "cat", "dog")
    rows = PairScorer([scorer])(inputs, edited)

    assert segmenter.prompts == [["cat", "cat", "dog", "dog"]]
    assert rows[0] == {"seg_iou": 0.5, "seg_area_input": 0.25, "seg_area_edited": 0.125}
    # Pair 1 has no object on either side: undefined, explained, and rejected by an IoU threshold.
    assert math.isnan(rows[1]["seg_iou"])
    assert rows[1]["nan_reason"] == "seg_iou: both masks empty: no 'cat' in the input, no 'dog' in the edited image"
    kept, reasons = judge(rows[1], {"seg_iou": 0.7, "clip_gain": None})
    assert not kept and reasons == ["seg_iou: nan (both masks empty: no 'cat' in the input, no 'dog' in the edited image)"]


def test_clip_scores_follow_the_documented_formulas():
    s, t = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    i0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    i1 = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 5.0]]) * 3  # lengths do not matter: features are normalised
    scores = clip_scores(i0, i1, s, t, logit_scale=10.0)

    p = lambda target_minus_source: 1 / (1 + math.exp(-10.0 * target_minus_source))  # noqa: E731
    assert scores["clip_input_source"].tolist() == pytest.approx([1.0, 0.0])
    assert scores["clip_edited_target"].tolist() == pytest.approx([0.8, 0.0])
    assert scores["clip_gain"][0].item() == pytest.approx(p(0.8 - 0.6) - p(0.0 - 1.0))
    # cos((-0.4, 0.8, 0), (-1, 1, 0)) = 1.2 / (sqrt(0.8) sqrt(2))
    assert scores["clip_direction"][0].item() == pytest.approx(1.2 / math.sqrt(1.6))
    assert scores["clip_image"][0].item() == pytest.approx(0.6)
    # An unchanged picture: no gain, no direction, identical images.
    assert scores["clip_gain"][1].item() == 0.0
    assert scores["clip_direction"][1].item() == 0.0
    assert scores["clip_image"][1].item() == pytest.approx(1.0)


def test_segmentation_words_come_from_the_task():
    task = OmegaConf.load(CONF / "task" / "cat2cat_glasses.yaml")
    assert segmentation_words(task) == ("cat", "cat wearing glasses")
    assert segmentation_words(OmegaConf.merge(task, {"seg_words": {"source": "cat", "target": "cat"}})) == ("cat", "cat")
    assert segmentation_words(OmegaConf.merge(task, {"seg_words": None})) is None  # e.g. a style task: CLIP only


@pytest.fixture(scope="module")
def tiny_scorer():
    task = OmegaConf.load(CONF / "task" / "cat2dog.yaml")
    return build_scorer(OmegaConf.load(CONF / "scorers" / "tiny.yaml"), task, "cpu", torch.float32)


def test_tiny_preset_scores_every_documented_name_as_its_parts_compute_them(tiny_scorer):
    generator = torch.Generator().manual_seed(0)
    inputs, edited = torch.rand(3, 3, 40, 48, generator=generator), torch.rand(3, 3, 40, 48, generator=generator)
    rows = tiny_scorer(inputs, edited)

    assert len(rows) == 3 and all(set(row) == DOCUMENTED_SCORES for row in rows)
    segmentation, clip = tiny_scorer.scorers
    features = clip.encoder.encode_images(torch.cat([inputs, edited]))
    expected = clip_scores(features[:3], features[3:], clip.source_features, clip.target_features, clip.encoder.logit_scale)
    masks = segmentation.segmenter.masks(torch.cat([inputs, edited]), ["cat"] * 3 + ["dog"] * 3)
    for i, row in enumerate(rows):
        assert row["clip_gain"] == pytest.approx(expected["clip_gain"][i].item(), abs=1e-6)
        assert row["clip_direction"] == pytest.approx(expected["clip_direction"][i].item(), abs=1e-5)
        assert row["seg_iou"] == pytest.approx(mask_iou(masks[:3], masks[3:])[i].item())


def test_clipseg_mask_threshold_decides_the_overlap(tiny_scorer):
    segmenter = tiny_scorer.scorers[0].segmenter
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    scorer = SegmentationScorer(segmenter, "cat", "dog")
    segmenter.mask_threshold = 0.0  # every pixel is the object: full overlap
    everything = PairScorer([scorer])(images[:1], images[1:])[0]
    segmenter.mask_threshold = 1.0  # no pixel is: undefined
    nothing = PairScorer([scorer])(images[:1], images[1:])[0]
    segmenter.mask_threshold = 0.5

    assert everything == {"seg_iou": 1.0, "seg_area_input": 1.0, "seg_area_edited": 1.0}
    assert math.isnan(nothing["seg_iou"]) and nothing["nan_reason"].startswith("seg_iou: both masks empty")


def test_local_folders_load_like_the_toy_worlds_models(tmp_path, tiny_scorer):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from datagen.tokenizer import clip_tokenizer

    # A CLIPModel saved with its processor (as toyworld/train.py saves one): features match transformers' own path.
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, **tower), vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16))
    pixels = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = CLIPProcessor(image_processor=pixels, tokenizer=clip_tokenizer())
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    encoder = TransformersClipEncoder.from_pretrained(str(tmp_path / "clip"))

    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(2)).float() / 255
    reference = processor(text=["a photo of a cat"], images=[(255 * image).byte().permute(1, 2, 0).numpy() for image in images], return_tensors="pt")
    with torch.no_grad():
        text_reference = F.normalize(model.get_text_features(input_ids=reference.input_ids).pooler_output, dim=-1)
        image_reference = F.normalize(model.get_image_features(pixel_values=reference.pixel_values).pooler_output, dim=-1)
    torch.testing.assert_close(encoder.encode_texts(["a photo of a cat"]), text_reference)
    torch.testing.assert_close(encoder.encode_images(images), image_reference, atol=1e-5, rtol=1e-4)

    # A CLIPSeg saved with weights and config only: the real tokenizer and default preprocessing stand in.
    segmenter = tiny_scorer.scorers[0].segmenter
    segmenter.model.save_pretrained(tmp_path / "segmenter")
    reloaded = ClipSegSegmenter.from_pretrained(str(tmp_path / "segmenter"))
    torch.testing.assert_close(reloaded.probabilities(images, ["cat", "dog"]), segmenter.probabilities(images, ["cat", "dog"]))


@pytest.mark.parametrize(
    "load, name",
    [
        (lambda: ClipSegSegmenter.from_pretrained("CIDAS/no-such-clipseg"), "CIDAS/no-such-clipseg"),
        (lambda: TransformersClipEncoder.from_pretrained("/no/such/folder"), "/no/such/folder"),
        (lambda: OpenClipEncoder.from_pretrained("ViT-B-32", "no-such-tag"), "ViT-B-32"),
    ],
)
def test_missing_scorer_model_names_it_and_the_offline_presets(load, name):
    with pytest.raises(MissingModelError) as error:
        load()
    assert name in str(error.value) and "model=tiny" in str(error.value) and "model=toy" in str(error.value)
