"""Endless training batches drawn fresh from the renderer, and the text prompts the models learn."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from toyworld.render import render
from toyworld.world import COLOURS, SHAPES, Scenes, captions, is_held_out, object_phrase, sample_scenes


@dataclass
class Batch:
    scenes: Scenes
    images: torch.Tensor     # N x 3 x S x S in [-1, 1]
    masks: torch.Tensor      # N x 2 x S x S in [0, 1]
    captions: list[str]


def batches(batch_size: int, seed: int, device: torch.device, partial_prob: float = 0.0,
            held_out: str = "exclude", twins: bool = False) -> Iterator[Batch]:
    """Fresh scenes every step: no dataset to store, and nothing to overfit.

    `twins`: half the batch are copies of the other half with another shape or colour. A contrastive
    model can then not tell captions apart by background and stripes alone, and must learn shapes."""
    rng = np.random.default_rng(seed)
    while True:
        scenes = sample_scenes(batch_size // 2 if twins else batch_size, rng, held_out=held_out)
        if twins:
            scenes = scenes.concat(scenes.twins(rng))
            scenes = scenes[~is_held_out(scenes)] if held_out == "exclude" else scenes
        images, masks = render(scenes, device)
        yield Batch(scenes, images * 2 - 1, masks, captions(scenes, rng, partial_prob))


class TokenCache:
    """Token ids of captions, 77 long like SD's, assembled from cached ids of each word.

    CLIP's BPE never merges across spaces, so a caption of lower-case words tokenizes as the concatenation
    of its words' tokens: looking words up is ~100x cheaper than tokenizing every fresh caption (which
    would cost more than a GPU training step). The tests check the equality."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._words: dict[str, list[int]] = {}

    def _word_ids(self, words: set[str]) -> None:
        new = sorted(words - self._words.keys())
        if new:
            self._words.update(zip(new, self.tokenizer(new, add_special_tokens=False).input_ids))

    def __call__(self, texts: list[str], device: torch.device) -> torch.Tensor:
        split = [text.split() for text in texts]
        self._word_ids({word for words in split for word in words})
        length, bos, eos = self.tokenizer.model_max_length, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        rows = []
        for words in split:
            tokens = ([bos] + [i for word in words for i in self._words[word]])[: length - 1] + [eos]
            rows.append(tokens + [self.tokenizer.pad_token_id] * (length - len(tokens)))
        return torch.tensor(rows, device=device)


def segmentation_prompts(scenes: Scenes, rng: np.random.Generator, masks: torch.Tensor,
                         absent_prob: float = 0.25) -> tuple[list[str], torch.Tensor]:
    """One referring phrase per scene and the union of the objects it fits (N x S x S).

    A phrase states some of an object's words ("striped circle", "red shape with a dot"); words left
    out do not constrain, so "circle" means every circle. With `absent_prob` the words are drawn at
    random instead, often fitting nothing: the mask must then stay empty."""
    phrases, fits = [], np.zeros(scenes.present.shape, bool)
    for i in range(len(scenes)):
        k = rng.choice(np.flatnonzero(scenes.present[i]))
        if rng.random() < absent_prob:
            shape, colour = rng.integers(len(SHAPES)), rng.integers(len(COLOURS))
            striped, dot = rng.random() < 0.3, rng.random() < 0.3
        else:
            shape, colour = scenes.shape[i, k], scenes.colour[i, k]
            striped, dot = scenes.striped[i, k] & (rng.random() < 0.5), scenes.dot[i, k] & (rng.random() < 0.5)
        say_shape, say_colour = rng.random() < 0.8, rng.random() < 0.5
        phrases.append(object_phrase(SHAPES[shape] if say_shape else None, COLOURS[colour] if say_colour else None,
                                     bool(striped), bool(dot)))
        fits[i] = (scenes.present[i] & ((not say_shape) | (scenes.shape[i] == shape))
                   & ((not say_colour) | (scenes.colour[i] == colour))
                   & ((not striped) | scenes.striped[i]) & ((not dot) | scenes.dot[i]))
    fitting = torch.as_tensor(fits, device=masks.device)[..., None, None]
    return phrases, (masks * fitting).amax(1)
