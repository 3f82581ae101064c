"""The toy world's vocabulary, its scenes and the words that describe them.

A scene is one or two objects (shape, colour, stripes, a dot) on a background (plain, gradient or
striped; light or dark), drawn filled or as an outline. Scenes are sampled in batches as arrays, from a
seed, so a dataset is reproducible; `render.py` turns them into pixels.

Captions follow one grammar that the CLIP, the diffusion model, the captioner and the sentence banks
share: "an outline drawing of a red striped circle with a dot on a dark gradient background". Stripes,
the dot and the outline style are always stated when present, so a caption without them means plain,
dotless, filled; only the colour, the shape (then "shape") and the background may be left unsaid.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOUR_RGB = np.array([
    (0.86, 0.14, 0.14), (0.15, 0.68, 0.22), (0.16, 0.32, 0.90),
    (0.95, 0.84, 0.12), (0.58, 0.22, 0.78), (0.98, 0.55, 0.10),
], dtype=np.float32)
BACKGROUNDS = ("plain", "gradient", "striped")
TONES = ("light", "dark")
STYLES = ("filled", "outline")
MAX_OBJECTS = 2


@dataclass
class Scenes:
    """A batch of N scenes; object arrays are N x MAX_OBJECTS, lengths in pixels of a `size`-wide image."""

    size: int
    present: np.ndarray      # bool N x 2: the second object is optional
    shape: np.ndarray        # int  N x 2, index into SHAPES
    colour: np.ndarray       # int  N x 2, index into COLOURS
    striped: np.ndarray      # bool N x 2
    dot: np.ndarray          # bool N x 2
    centre: np.ndarray       # float N x 2 x 2 (x, y)
    radius: np.ndarray       # float N x 2
    tint: np.ndarray         # float N x 2 x 3, small colour jitter so "red" is a range, not one value
    stripe_angle: np.ndarray  # float N x 2, radians
    background: np.ndarray   # int  N, index into BACKGROUNDS
    dark: np.ndarray         # bool N
    shade: np.ndarray        # float N x 3, the background's base colour
    background_angle: np.ndarray  # float N, direction of the gradient or the stripes
    outline: np.ndarray      # bool N: the drawing style of the whole image

    def __len__(self) -> int:
        return len(self.dark)

    def __getitem__(self, index: slice | np.ndarray) -> "Scenes":
        return Scenes(self.size, *(getattr(self, f.name)[index] for f in fields(self)[1:]))

    def concat(self, other: "Scenes") -> "Scenes":
        return Scenes(self.size, *(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)[1:]))

    def twins(self, rng: np.random.Generator) -> "Scenes":
        """Copies that differ from each scene in the first object's shape (or, a third of the time, its colour)."""
        twins = self[np.arange(len(self))]
        change_shape = rng.random(len(self)) < 2 / 3
        shifted_shape = (twins.shape[:, 0] + rng.integers(1, len(SHAPES), len(self))) % len(SHAPES)
        shifted_colour = (twins.colour[:, 0] + rng.integers(1, len(COLOURS), len(self))) % len(COLOURS)
        twins.shape[:, 0] = np.where(change_shape, shifted_shape, twins.shape[:, 0])
        twins.colour[:, 0] = np.where(change_shape, twins.colour[:, 0], shifted_colour)
        return twins


def sample_scenes(n: int, seed: int | np.random.Generator, size: int = 32, two_object_prob: float = 0.2,
                  held_out: str = "exclude") -> Scenes:
    """N random scenes. `held_out`: "exclude" (training data), "only" (single-object scenes whose full
    description was never trained on, for evaluation) or "any"."""
    rng = np.random.default_rng(seed)
    scenes = _draw(n, rng, size, two_object_prob if held_out != "only" else 0.0)
    if held_out == "any":
        return scenes
    # Redraw rejected rows until every row is on the wanted side of the split; each round keeps ~90%/10%.
    while True:
        wrong = is_held_out(scenes) != (held_out == "only")
        if not wrong.any():
            return scenes
        redraw = _draw(int(wrong.sum()), rng, size, two_object_prob if held_out != "only" else 0.0)
        for f in fields(Scenes)[1:]:
            getattr(scenes, f.name)[wrong] = getattr(redraw, f.name)


def _draw(n: int, rng: np.random.Generator, size: int, two_object_prob: float) -> Scenes:
    two = rng.random(n) < two_object_prob
    present = np.stack([np.ones(n, bool), two], axis=1)
    # One object sits anywhere near the middle; two objects share the image left and right.
    radius = np.where(two[:, None], rng.uniform(0.13, 0.18, (n, 2)), rng.uniform(0.18, 0.28, (n, 2))) * size
    single_centre = rng.uniform(0.32, 0.68, (n, 2, 2))
    left_right = np.stack([rng.uniform(0.22, 0.3, n), rng.uniform(0.7, 0.78, n)], axis=1)
    pair_centre = np.stack([left_right, rng.uniform(0.35, 0.65, (n, 2))], axis=2)
    centre = np.where(two[:, None, None], pair_centre, single_centre) * size
    dark = rng.random(n) < 0.5
    grey = np.where(dark, rng.uniform(0.06, 0.22, n), rng.uniform(0.78, 0.95, n))
    return Scenes(
        size=size,
        present=present,
        shape=rng.integers(0, len(SHAPES), (n, 2)),
        colour=rng.integers(0, len(COLOURS), (n, 2)),
        striped=rng.random((n, 2)) < 0.5,
        dot=rng.random((n, 2)) < 0.5,
        centre=centre.astype(np.float32),
        radius=radius.astype(np.float32),
        tint=rng.uniform(-0.06, 0.06, (n, 2, 3)).astype(np.float32),
        stripe_angle=rng.uniform(0, np.pi, (n, 2)).astype(np.float32),
        background=rng.integers(0, len(BACKGROUNDS), n),
        dark=dark,
        shade=np.clip(grey[:, None] + rng.uniform(-0.04, 0.04, (n, 3)), 0, 1).astype(np.float32),
        background_angle=rng.uniform(0, 2 * np.pi, n).astype(np.float32),
        outline=rng.random(n) < 0.5,
    )


def is_held_out(scenes: Scenes) -> np.ndarray:
    """Single-object descriptions set aside from training: ~10% of the 1152, chosen by a fixed hash."""
    combo = scenes.shape[:, 0]
    for value, levels in ((scenes.colour[:, 0], len(COLOURS)), (scenes.striped[:, 0], 2), (scenes.dot[:, 0], 2),
                          (scenes.outline, 2), (scenes.background, len(BACKGROUNDS)), (scenes.dark, 2)):
        combo = combo * levels + value
    return ~scenes.present[:, 1] & ((combo.astype(np.uint64) * 2654435761 % 2**32) % 10 == 0)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(shape: str | None, colour: str | None, striped: bool, dot: bool) -> str:
    """ "red striped circle with a dot"; the shape left unsaid is "shape", the colour simply omitted."""
    words = [colour] if colour else []
    words += ["striped"] if striped else []
    words += [shape or "shape"]
    return " ".join(words) + (" with a dot" if dot else "")


def background_phrase(background: str | None, tone: str | None) -> str:
    words = [w for w in (tone, None if background in (None, "plain") else background) if w]
    return f"on {article(words[0]) if words else 'a'} {' '.join(words + ['background'])}"


def caption(scenes: Scenes, i: int, rng: np.random.Generator | None = None, partial_prob: float = 0.0) -> str:
    """The caption of scene i; with probability `partial_prob` some colour/shape/background words are dropped."""
    drop = rng is not None and rng.random() < partial_prob
    keep = (lambda: rng.random() < 0.5) if drop else (lambda: True)
    phrases = []
    for k in np.flatnonzero(scenes.present[i]):
        phrase = object_phrase(SHAPES[scenes.shape[i, k]] if keep() else None,
                               COLOURS[scenes.colour[i, k]] if keep() else None,
                               bool(scenes.striped[i, k]), bool(scenes.dot[i, k]))
        phrases.append(f"{article(phrase)} {phrase}")
    text = " and ".join(phrases)
    if scenes.outline[i]:
        text = f"an outline drawing of {text}"
    if keep():
        tone = TONES[int(scenes.dark[i])] if keep() else None
        text += " " + background_phrase(BACKGROUNDS[scenes.background[i]] if keep() else None, tone)
    return text


def captions(scenes: Scenes, rng: np.random.Generator | None = None, partial_prob: float = 0.0) -> list[str]:
    return [caption(scenes, i, rng, partial_prob) for i in range(len(scenes))]
