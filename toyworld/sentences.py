"""Sentence banks of the toy tasks, written in the world's caption grammar: `python -m toyworld.sentences`.

Each bank fixes the task's attribute (a circle, stripes, an outline ...) and varies everything else
(colour, the other attributes, the background, which words are left unsaid) at random, so that in the
edit direction mean(target) - mean(source) only the task's attribute survives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from toyworld.world import SHAPES, captions, sample_scenes

SENTENCES = Path(__file__).resolve().parent.parent / "datagen" / "sentences"
BANKS = {  # bank name -> the attributes its scenes are given, and a word every sentence must say
    "circle": (dict(shape=SHAPES.index("circle"), dot=False), "circle"),
    "square": (dict(shape=SHAPES.index("square"), dot=False), "square"),
    "circle_dot": (dict(shape=SHAPES.index("circle"), dot=True), "circle"),
    "plain_shape": (dict(striped=False), None),
    "striped_shape": (dict(striped=True), None),
    "outline_shape": (dict(outline=True), None),
    "filled_shape": (dict(outline=False), None),
}


def bank(name: str, size: int = 250, seed: int = 0) -> list[str]:
    """`size` distinct sentences of single-object scenes with the bank's attributes, about a third of them partial
    (some words left unsaid, never the bank's own word)."""
    rng = np.random.default_rng([seed, list(BANKS).index(name)])
    sentences: dict[str, None] = {}
    while len(sentences) < size:
        scenes = sample_scenes(4 * size, rng, two_object_prob=0.0, held_out="any")
        attributes, word = BANKS[name]
        for attribute, value in attributes.items():
            getattr(scenes, attribute)[...] = value  # single objects: the second slot is absent anyway
        said = [s for s in captions(scenes, rng, partial_prob=0.3) if word is None or word in s.split()]
        sentences.update(dict.fromkeys(said))
    return list(sentences)[:size]


def write_banks(folder: Path = SENTENCES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in BANKS:
        (folder / f"{name}.txt").write_text("\n".join(bank(name)) + "\n")


if __name__ == "__main__":
    write_banks()
