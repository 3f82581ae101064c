"""python -m toyworld.examples [--out toyworld/examples] [--shape circle] [--n 16] [--seed 4242] [--captions]

Fresh renders of one shape as PNG files: inputs for `translate.py` that no generation run has seen
(the quickstart translates toyworld/examples/, made by this command with its defaults). With --captions,
each image gets its true caption as a sidecar `.txt` (what `source=folder` reads instead of the captioner)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image

from toyworld.render import render
from toyworld.world import SHAPES, captions, sample_scenes


def write_examples(out: Path, shape: str = "circle", n: int = 16, seed: int = 4242, with_captions: bool = False) -> list[Path]:
    scenes = sample_scenes(n, seed, two_object_prob=0.0, held_out="any")
    scenes.shape[:] = SHAPES.index(shape)
    images, _ = render(scenes, torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{shape}-{i:02d}.png" for i in range(n)]
    for image, path, text in zip(images, paths, captions(scenes)):
        save_image(image, path)
        if with_captions:
            path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "examples")
    parser.add_argument("--shape", default="circle", choices=SHAPES)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--captions", action="store_true", help="write each image's true caption beside it (name.txt)")
    args = parser.parse_args(argv)
    paths = write_examples(args.out, args.shape, args.n, args.seed, args.captions)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
