"""StyleDiffusion (Li et al., arXiv 2303.15649; STYLEDIFFUSION.md section 2): real images inverted by per-step
mapping networks onto the value input of the cross-attention layers (`datagen.inversions.stylediffusion`), then
edited with Prompt-to-Prompt plus P2Plus, as the official `stylediffusion.py` runs them.

Each input is Prompt-to-Prompt's group [source, target] from the inversion's x_T, with the fixed null embedding as
both rows' unconditional input, and on top of Prompt-to-Prompt's controls:
- value input (conditional half, every cross-attention layer): the source's c_src * s_i + b_i at every step (it
  retraces the inversion), the target's c_tgt * s_i + b_i for steps i < tau_v N, then plain c_tgt;
- P2Plus: the target's unconditional self-attention maps <- the source's at the layers with at most
  `self_max_queries` queries for the steps of tau_u; unconditional cross-attention is never touched;
- the target's changed words (LocalBlend's) reweighted by `blend_word_weight` (the official eq_params: x2).

Inversions are cached by image, prompt and settings under the run's cache_dir: many edits of one image, and every
rerun, share one inversion. Options and their official defaults: conf/editor/stylediffusion.yaml.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from datagen.attention import AttentionHook, MapInjection, ValueModulation
from datagen.backbone import Backbone
from datagen.editors.base import EditBatch
from datagen.editors.p2p import Plan, PromptToPrompt, Steps, blend_words, step_range
from datagen.image_tokens import image_tokens_for
from datagen.inversion_cache import InversionCache, model_fingerprint
from datagen.inversions import Inversion
from datagen.inversions.stylediffusion import StyleDiffusionInversion
from datagen.prompts import word_token_indices


class StyleDiffusion(PromptToPrompt):
    """`EditBatch.prompts` are the real images' captions (the inversion's source prompts), `target_prompts` the edits.
    `value_steps` is tau_v, `cross_replace_steps` tau_c, `self_replace_steps` tau_s, `uncond_self_replace_steps`
    tau_u; `steps_offset` (0, the code's own DDIM scheduler; null: the model's) sets the timesteps of inversion and
    editing; `image_encoder` is E(x) (null: by model, `datagen.image_tokens`); `inversion_options` go to
    StyleDiffusionInversion; `cache_dir` (the run's) keeps finished inversions, null: none."""

    uses_cache_dir = True

    def __init__(
        self,
        backbone: Backbone,
        resolution: int,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        mode: str = "auto",
        reweight: Mapping[str, float] | None = None,
        blend_word_weight: float | None = 2.0,
        value_steps: float = 0.6,
        cross_replace_steps: Steps | Mapping[str, Steps] = 0.6,
        self_replace_steps: Steps = 0.8,
        uncond_self_replace_steps: Steps = 0.5,
        self_max_queries: int = 32 * 32,
        local_blend: bool = True,
        blend_threshold: float = 0.3,
        blend_start: float = 0.2,
        blend_resolution: int | None = None,
        steps_offset: int | None = 0,
        image_encoder: str | None = None,
        inversion_options: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        if steps_offset is not None:  # the code's DDIMScheduler(...) has steps_offset 0: tau_i = 957 - 33 i at N = 30
            config = backbone.scheduler.config
            backbone = replace(backbone, scheduler=DDIMScheduler.from_config(config, steps_offset=steps_offset),
                               inverse_scheduler=DDIMInverseScheduler.from_config(config, steps_offset=steps_offset))
        options = dict(inversion_options or {})
        super().__init__(backbone, resolution, num_inference_steps, guidance_scale, mode, reweight, cross_replace_steps,
                         self_replace_steps, self_max_queries, "cond", local_blend, blend_threshold, blend_start,
                         blend_resolution, StyleDiffusionInversion(**options), compile=compile)
        self.blend_word_weight, self.value_steps = blend_word_weight, value_steps
        self.uncond_self_steps = step_range(uncond_self_replace_steps, num_inference_steps)
        self.image_tokens = image_tokens_for(self.backbone, image_encoder)
        # One hook object of each kind for the editor's life, as Prompt-to-Prompt's.
        self.uncond_injection = MapInjection(halves="uncond", self_max_queries=self_max_queries)  # P2Plus
        self.values = ValueModulation()
        # what an inversion depends on (the edit's schedules, blend and reweighting do not)
        settings = {"inversion": vars(self.inverter), "num_inference_steps": num_inference_steps,
                    "guidance_scale": guidance_scale, "scheduler": dict(self.backbone.scheduler.config),
                    "model": model_fingerprint(self.backbone), "image_encoder": self.image_tokens.name,
                    "resolution": resolution}
        folder = None if cache_dir is None else Path(cache_dir).expanduser() / "stylediffusion"
        self.cache = InversionCache(folder, settings)

    def reweights(self, sources: list[str], targets: list[str]) -> torch.Tensor | None:
        weights = super().reweights(sources, targets)
        if self.blend_word_weight is None:
            return weights
        weights = torch.ones(len(targets), 77) if weights is None else weights  # B x 77
        for b, (source, target) in enumerate(zip(sources, targets)):
            for word in blend_words(source, target)[1]:
                weights[b, word_token_indices(target, word, self.backbone.tokenizer)] = self.blend_word_weight
        return weights

    def invert(self, batch: EditBatch, cond: torch.Tensor, null: torch.Tensor) -> Inversion:
        """The inversions of the batch's images: the cached ones loaded, the others made together (an image and
        prompt met twice, once) and saved."""
        if batch.images is None:
            raise ValueError("StyleDiffusion inverts real images: use a source of real images (source=folder|shards)")
        bb, size, steps = self.backbone, len(batch.seeds), self.num_inference_steps
        keys = [self.cache.key(image, prompt) for image, prompt in zip(batch.images, batch.prompts)]
        entries = [self.cache.load(key) for key in keys]
        made_here: list[int] = []  # the first input of each (image, prompt) the cache lacks
        for b, (key, entry) in enumerate(zip(keys, entries)):
            if entry is None and all(keys[m] != key for m in made_here):
                made_here.append(b)
        if made_here:
            images = batch.images[made_here]
            generators = [torch.Generator().manual_seed(batch.seeds[b]) for b in made_here]
            made = self.inverter(bb, bb.encode_images(images * 2 - 1), cond[made_here], null[made_here], steps,
                                 self.guidance_scale, generators, image_tokens=self.image_tokens(images))
            scales, shifts = (torch.stack(parts, 1).cpu() for parts in zip(*made.values))  # B' x N x 77 x D
            for j, b in enumerate(made_here):  # clones: torch.save writes a view's whole storage
                entries[b] = {"x_T": made.x_T[j].cpu().clone(), "scale": scales[j].clone(), "shift": shifts[j].clone(),
                              "record": made.records[j]}
                self.cache.save(keys[b], entries[b])
            first = {keys[b]: entries[b] for b in made_here}
            entries = [entry if entry is not None else first[key] for entry, key in zip(entries, keys)]
        scale, shift = (torch.stack([entry[key] for entry in entries], 1).to(bb.device) for key in ("scale", "shift"))
        records = [{**entry["record"], "cached": b not in made_here} for b, entry in enumerate(entries)]
        unet_evals = sum(records[b]["unet_evals"] for b in made_here)
        return Inversion(torch.stack([entry["x_T"] for entry in entries]).to(bb.device),
                         values=list(zip(scale.unbind(0), shift.unbind(0))),  # per step, B x 77 x D each
                         unet_evals=round(unet_evals / size), records=records)

    def controls(self, plan: Plan, inversion: Inversion, size: int) -> tuple[tuple[AttentionHook, ...], Callable[[int], None]]:
        hooks, p2p_step = super().controls(plan, inversion, size)
        plain = torch.ones_like(inversion.values[0][0]), torch.zeros_like(inversion.values[0][1])  # B x 77 x D: c itself

        def before_step(i: int) -> None:
            p2p_step(i)
            self.uncond_injection.self_active = i in self.uncond_self_steps
            source = inversion.values[i]
            target = source if i < self.value_steps * self.num_inference_steps else plain
            # UNet rows (half, input, member): the unconditional half keeps c_null, the conditional half is modulated
            self.values.scale, self.values.shift = (
                torch.cat([plain[k].repeat_interleave(2, 0), torch.stack([source[k], target[k]], 1).flatten(0, 1)])
                for k in (0, 1))

        return hooks + (self.uncond_injection, self.values), before_step
