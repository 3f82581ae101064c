import open_clip
import torch

from datagen.tokenizer import clip_tokenizer

SENTENCES = [
    "a photo of a cat.", "A DOG wearing Glasses!!", "naïve café, 123 crème brûlée", "tree\twinter   tree",
    "an oil pastel painting of a horse", "😀 emoji and ünïcödé", "x " * 100, "",
]


def test_ids_equal_open_clip_and_sd_padding():
    ids = clip_tokenizer()(SENTENCES, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    reference = open_clip.get_tokenizer("ViT-L-14")(SENTENCES)
    reference[reference == 0] = 49407  # open_clip pads with 0, Stable Diffusion with <|endoftext|>
    assert ids.shape == (len(SENTENCES), 77)
    assert torch.equal(ids, reference)
    assert ids[0, 0] == 49406 and clip_tokenizer().model_max_length == 77
