"""python -m toyworld.reconstruction --images DIR [--steps 30] [--cache-dir ~/.cache/pairforge] [--out FILE.json]

Reconstruction of captioned real images (`python -m toyworld.examples --captions`) by the toy world's UNet after
three inversions, each sampled back at guidance 7.5 with its caption: DDIM inversion as is, null-text inversion (10
inner steps) and StyleDiffusion (conf/editor/stylediffusion.yaml). PSNR (dB, images in [0, 1]) against the input
image and against the VAE's own reconstruction (the ceiling). StyleDiffusion's inversions go to `--cache-dir`, the
generation runs' default: `generate.py editor=stylediffusion` on the same folder then reuses them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import datagen.config  # noqa: F401  (the ${repo:} resolver)
from datagen.backbone import load_backbone
from datagen.editors.base import EditBatch, denoise
from datagen.inversions.ddim import ddim_trajectory
from datagen.inversions.null_text import NullTextInversion
from datagen.sources import FolderSource

CONF = Path(__file__).resolve().parent.parent / "conf"


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of -10 log10(MSE)."""
    return float((-10 * torch.log10((x - reference).square().flatten(1).mean(1))).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30, help="every method's steps (StyleDiffusion's own: 30)")
    parser.add_argument("--cache-dir", default="~/.cache/pairforge")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # value_steps 1 and the source's own prompt as the target: the edited row is the source row (tested identity)
        cfg = compose(config_name="generate", overrides=[
            "model=toy", "editor=stylediffusion", f"editor.num_inference_steps={args.steps}", "editor.value_steps=1.0"])
    backbone = load_backbone(cfg.model, "cpu")
    source = FolderSource(str(args.images), resolution=cfg.model.resolution)
    samples = [source[i] for i in range(len(source))]
    images, prompts = torch.stack([s.image for s in samples]), [s.prompt for s in samples]
    latents = backbone.encode_images(images * 2 - 1)
    cond, null = backbone.encode_text(prompts), backbone.encode_text([""] * len(prompts))
    generators = [torch.Generator().manual_seed(s.seed) for s in samples]
    figures, seconds = {"vae": psnr(backbone.decode_latents(latents), images)}, {}
    reconstructions = {}

    start = time.perf_counter()
    x_T = ddim_trajectory(backbone, latents, cond, args.steps, None, generators)[-1]
    reconstructions["ddim"] = denoise(backbone, x_T, cond, null, 7.5, args.steps)
    seconds["ddim"] = time.perf_counter() - start

    start = time.perf_counter()
    inversion = NullTextInversion()(backbone, latents, cond, null, args.steps, 7.5, generators)
    reconstructions["null_text"] = denoise(backbone, inversion.x_T, cond, inversion.uncond, 7.5, args.steps)
    seconds["null_text"] = time.perf_counter() - start

    start = time.perf_counter()
    editor = instantiate(cfg.editor, _partial_=True)(backbone=backbone, resolution=cfg.model.resolution,
                                                    cache_dir=args.cache_dir)
    result = editor.edit(EditBatch([s.seed for s in samples], prompts, images, prompts))
    seconds["stylediffusion"] = time.perf_counter() - start

    vae = backbone.decode_latents(latents)
    for name, x in reconstructions.items():
        decoded = backbone.decode_latents(x)
        figures[name] = psnr(decoded, images)
        figures[f"{name}_vs_vae"] = psnr(decoded, vae)
    figures["stylediffusion"] = psnr(result.edited, images)
    figures["stylediffusion_vs_vae"] = psnr(result.edited, vae)
    records = [r["inversion"] for r in result.records]
    report = {"images": len(samples), "steps": args.steps, "psnr_db": {k: round(v, 2) for k, v in figures.items()},
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "stylediffusion_cached": sum(r["cached"] for r in records),
              "stylediffusion_inner_steps": sum(sum(r["inner_steps"]) for r in records) / len(records)}
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
