"""Prompt-to-Prompt (Hertz et al., ICLR 2023) as google/prompt-to-prompt and PnP-Inversion run it (EDITORS.md
section 1), batched over many inputs.

Each input is a group of two rows, [source, target], sampled together from one x_T with classifier-free guidance:
rows (input, member) in each guidance half. At every step the target's attention is rebuilt from the source's
in the conditional half (`datagen.attention.MapInjection`): cross-attention by the Replace or Refine mapping of
the two prompts (optionally reweighted) while the alpha schedule is on, self-attention at the layers with at most
`self_max_queries` queries while the self schedule is on. After each scheduler step, LocalBlend keeps the
target's latents on the source's outside the words that changed. The source row is never edited: it is the
source prompt's own sample (synthetic inputs, and then the pair's input image) or the inversion of the real image.

Only the layers a hook reads at a step compute explicit attention; everything else runs fused SDPA.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from datagen.attention import AttentionHook, CrossMapEdit, MapInjection, Site, controlled_processors
from datagen.backbone import Backbone
from datagen.editors.base import EditBatch, Editor, EditResult, compiled, denoise, finite_rows, initial_noise
from datagen.inversions import Inversion, Inverter, make_inverter
from datagen.prompts import (FUNCTION_WORDS, choose_mode, cross_replace_alphas, refine_alignment, replace_mapper,
                             reweight_vector, word_token_indices)

Steps = float | tuple[float, float]  # a fraction c of the steps from the start, or an interval (a, b) of fractions
MODES = ("replace", "refine", "auto")
HALVES = ("cond", "uncond", "both")


def steps_of(value: Any) -> Steps | dict[str, Steps]:
    """A schedule as Python values: a config's list becomes an interval, its mapping a dict (per-word schedules)."""
    if isinstance(value, Mapping):
        return {str(key): steps_of(steps) for key, steps in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        start, end = value
        return float(start), float(end)
    return float(value)


def step_range(value: Any, num_steps: int) -> range:
    """The steps a self-attention schedule (a fraction s, or an interval (a, b)) is on: the official
    [int(N a), int(N b)), s meaning (0, s)."""
    steps = steps_of(value)
    start, end = (0.0, steps) if isinstance(steps, float) else steps
    return range(int(num_steps * start), int(num_steps * end))


def cross_map_sides(unet: UNet2DConditionModel, latent_side: int) -> list[int]:
    """The query-map sides of the cross-attention layers of the UNet's down and up blocks (LocalBlend leaves the
    mid block out) for latents `latent_side` wide. Each down block but the last halves the side, rounding up as
    its stride-2 convolution does; up block k runs at the side of down block n - 1 - k."""
    kinds_down, kinds_up = unet.config.down_block_types, unet.config.up_block_types
    sides = [latent_side]
    for _ in kinds_down[1:]:
        sides.append(-(-sides[-1] // 2))
    down = {side for side, kind in zip(sides, kinds_down) if "CrossAttn" in kind}
    up = {side for side, kind in zip(reversed(sides), kinds_up) if "CrossAttn" in kind}
    return sorted(down | up)


def blend_side(unet: UNet2DConditionModel, latent_side: int, blend_resolution: int | None = None) -> int:
    """The side of the cross-attention maps LocalBlend reads: `blend_resolution`, by default the latent side / 4
    (SD's five 16 x 16 layers of a 64 x 64 latent), snapped to the nearest side the UNet has (the larger on a tie)."""
    sides = cross_map_sides(unet, latent_side)
    if not sides:
        raise ValueError("local_blend reads cross-attention maps, and this UNet's down and up blocks have none")
    wanted = latent_side // 4 if blend_resolution is None else blend_resolution
    return min(sides, key=lambda side: (abs(side - wanted), -side))


def blend_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """LocalBlend's words: those of `source` and of `target` that a word-level diff of the two prompts finds
    changed, lower case, without punctuation or function words (their attention covers the whole image), each once.
    An insertion leaves the source's list empty, and an empty list gives an empty mask, as in the official code."""
    def words(prompt: str) -> list[str]:
        return [word.strip(".,;:!?\"'()").lower() for word in prompt.split()]

    a, b = words(source), words(target)
    changed_a, changed_b = [], []
    for op, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op != "equal":
            changed_a += a[i1:i2]
            changed_b += b[j1:j2]

    def content(changed: list[str]) -> list[str]:
        return list(dict.fromkeys(word for word in changed if word and word not in FUNCTION_WORDS))

    return content(changed_a), content(changed_b)


def cross_map_edit(edits: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], reweight: torch.Tensor | None,
                   device: torch.device, dtype: torch.dtype) -> CrossMapEdit:
    """One batch's CrossMapEdit from each input's Replace matrix (77 x 77) or Refine (mapper, alphas) (77 each).
    A batch mixing the two writes its refines as matrices, M[w, n] = alphas[n] [mapper[n] = w], with the target's
    own share keep = 1 - alphas: the same R, one einsum for every input."""
    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype if x.is_floating_point() else x.dtype)

    reweight = None if reweight is None else on_device(reweight)
    refines = [edit for edit in edits if isinstance(edit, tuple)]
    if not refines:
        return CrossMapEdit(replace=on_device(torch.stack(edits)), reweight=reweight)
    if len(refines) == len(edits):
        mappers, alphas = zip(*refines)
        return CrossMapEdit(refine=(on_device(torch.stack(mappers)), on_device(torch.stack(alphas))), reweight=reweight)
    matrices, keeps = [], []
    for edit in edits:
        if isinstance(edit, tuple):
            mapper, alphas = edit
            matrices.append(F.one_hot(mapper.clamp(min=0), len(mapper)).T.float() * alphas)  # (w, n)
            keeps.append(1 - alphas)
        else:
            matrices.append(edit)
            keeps.append(torch.zeros(len(edit)))
    return CrossMapEdit(replace=on_device(torch.stack(matrices)), keep=on_device(torch.stack(keeps)), reweight=reweight)


@dataclass(eq=False)
class WordMaps(AttentionHook):
    """LocalBlend's maps, as nt.ipynb's attention store gives them but reduced as they are made: at the down and up
    blocks' cross-attention layers whose query map is `side` x `side`, each row's attention to its blend words in
    the conditional half (the official store's), summed over those tokens, the heads, the layers and the steps so
    far. The official mean over heads and layers differs by a constant factor, which LocalBlend's division by
    each map's maximum removes. Set `words` and a zero `total` before a run; `words` None reads nothing."""

    side: int
    words: torch.Tensor | None = None  # rows x 77: 1 at the tokens of each row's blend words
    total: torch.Tensor | None = None  # rows x side^2, fp32

    def reads(self, site: Site, queries: int) -> bool:
        return self.words is not None and site.cross and site.place != "mid" and queries == self.side ** 2

    def __call__(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        cond = probs[probs.shape[0] // 2 :].float()  # (rows, heads, queries, 77)
        self.total = self.total + torch.einsum("rhqk,rk->rq", cond, self.words)
        return probs


@dataclass
class Plan:
    """One batch's controls, per input: the mode, the blend words, and the step schedules on the device."""

    modes: list[str]
    words: list[tuple[list[str], list[str]]] | None  # per input: (source's, target's) blend words; None: no blend
    cross_edit: CrossMapEdit
    cross_alphas: torch.Tensor  # (N + 1) x B x 77 in the UNet's dtype: row i is step i's
    cross_on: list[bool]  # per step, on the host: whether any alpha is on (else the cross layers stay fused)
    word_indicator: torch.Tensor | None  # 2B x 77 fp32, rows (input, member): 1 at each row's blend-word tokens


class PromptToPrompt(Editor):
    """Prompt-to-Prompt over batches of inputs; `EditBatch.prompts` are the source prompts (captions of real
    inputs), `target_prompts` the edits. Options and their official defaults: conf/editor/p2p.yaml."""

    uses_target_prompts = True

    def __init__(
        self,
        backbone: Backbone,
        resolution: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        mode: str = "auto",
        reweight: Mapping[str, float] | None = None,
        cross_replace_steps: Steps | Mapping[str, Steps] = 0.8,
        self_replace_steps: Steps = 0.4,
        self_max_queries: int = 32 * 32,
        halves: str = "cond",
        local_blend: bool = False,
        blend_threshold: float = 0.3,
        blend_start: float = 0.2,
        blend_resolution: int | None = None,
        inversion: str | Inverter = "ddim",
        inversion_options: Mapping[str, Any] | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if halves not in HALVES:
            raise ValueError(f"halves must be one of {', '.join(HALVES)}, not {halves!r}")
        if guidance_scale == 1:  # guidance 1 runs the conditional half alone, and the controls address halves
            raise ValueError("Prompt-to-Prompt samples with classifier-free guidance: guidance_scale must not be 1")
        self.backbone, self.resolution = compiled(backbone, compile), resolution
        self.num_inference_steps, self.guidance_scale, self.mode = num_inference_steps, guidance_scale, mode
        self.reweight = None if reweight is None else {str(word): float(value) for word, value in reweight.items()}
        self.cross_replace_steps = steps_of(cross_replace_steps)
        self.self_steps = step_range(self_replace_steps, num_inference_steps)
        self.local_blend, self.blend_threshold = local_blend, blend_threshold
        self.blend_start = int(blend_start * num_inference_steps)  # the official counter > int(0.2 N)
        self.inverter = inversion if isinstance(inversion, Inverter) else make_inverter(inversion, **dict(inversion_options or {}))
        self.control, self.processors = controlled_processors(backbone.unet)
        # One hook object of each kind for the editor's life: a compiled UNet meets the objects it was traced with.
        self.injection = MapInjection(halves=halves, self_max_queries=self_max_queries)
        latent_side = backbone.latent_shape(resolution)[-1]
        self.word_maps = WordMaps(blend_side(backbone.unet, latent_side, blend_resolution)) if local_blend else None
        self.null = backbone.encode_text([""])  # 1 x 77 x D

    def plan(self, sources: list[str], targets: list[str]) -> Plan | None:
        """The batch's controls; None: none at all, the target samples alone (word swap)."""
        bb, tokenizer = self.backbone, self.backbone.tokenizer
        modes = [choose_mode(s, t, tokenizer) if self.mode == "auto" else self.mode for s, t in zip(sources, targets)]
        edits = [replace_mapper(s, t, tokenizer) if mode == "replace" else refine_alignment(s, t, tokenizer)
                 for s, t, mode in zip(sources, targets, modes)]
        reweight = self.reweights(sources, targets)
        pairs = list(zip(sources, targets))
        alphas = cross_replace_alphas(self.num_inference_steps, pairs, self.cross_replace_steps, tokenizer)  # (N+1) x B x 77
        words = indicator = None
        if self.local_blend:
            words = [blend_words(s, t) for s, t in pairs]
            indicator = torch.zeros(len(pairs), 2, alphas.shape[-1])  # input, member, token
            for b, pair in enumerate(pairs):
                for member, (prompt, chosen) in enumerate(zip(pair, words[b])):
                    for word in chosen:
                        indicator[b, member, word_token_indices(prompt, word, tokenizer)] = 1
            indicator = indicator.flatten(0, 1).to(bb.device)
        return Plan(modes, words, cross_map_edit(edits, reweight, bb.device, bb.dtype), alphas.to(bb.device, bb.dtype),
                    alphas.flatten(1).any(1).tolist(), indicator)

    def reweights(self, sources: list[str], targets: list[str]) -> torch.Tensor | None:
        """The batch's equalizer on the targets' tokens (B x 77), or None: no reweighting."""
        if self.reweight is None:
            return None
        return torch.stack([reweight_vector(t, self.reweight, self.backbone.tokenizer) for t in targets])

    def invert(self, batch: EditBatch, cond: torch.Tensor, null: torch.Tensor) -> Inversion:
        """Where each input's rows start: x_T from its seed, or the inversion of its real image (`cond` its caption's
        embedding, `null` the null embedding, B x 77 x D each)."""
        bb = self.backbone
        if batch.images is None:
            return Inversion(initial_noise(bb, batch.seeds, self.resolution))
        generators = [torch.Generator().manual_seed(seed) for seed in batch.seeds]
        latents = bb.encode_images(batch.images * 2 - 1)
        return self.inverter(bb, latents, cond, null, self.num_inference_steps, self.guidance_scale, generators)

    def controls(self, plan: Plan, inversion: Inversion, size: int) -> tuple[tuple[AttentionHook, ...], Callable[[int], None]]:
        """The hooks of one batch's sampling run and what sets them before step i."""
        self.injection.cross_edit, hooks = plan.cross_edit, (self.injection,)
        if self.word_maps is not None:
            self.word_maps.words = plan.word_indicator
            self.word_maps.total = torch.zeros(2 * size, self.word_maps.side ** 2, device=self.backbone.device)
            hooks += (self.word_maps,)

        def before_step(i: int) -> None:
            self.injection.cross_alpha = plan.cross_alphas[i] if plan.cross_on[i] else None  # B x 77
            self.injection.self_active = i in self.self_steps

        return hooks, before_step

    def record(self, plan: Plan | None, b: int) -> dict:
        """What input b's json says about its edit."""
        return {"p2p": {"mode": plan.modes[b], "blend_words": None if plan.words is None else list(plan.words[b])}}

    def edit(self, batch: EditBatch) -> EditResult:
        if batch.target_prompts is None or len(batch.target_prompts) != len(batch.prompts):
            raise ValueError(f"{type(self).__name__} samples with EditBatch.target_prompts, one per input")
        start = time.perf_counter()
        bb, size, steps, w = self.backbone, len(batch.seeds), self.num_inference_steps, self.guidance_scale
        bb.unet.set_attn_processor(dict(self.processors))  # diffusers pops the entries it installs
        sources, targets = list(batch.prompts), list(batch.target_prompts)
        cond_source, cond_target = bb.encode_text(sources), bb.encode_text(targets)  # B x 77 x D each
        null = self.null.expand(size, -1, -1)
        inversion = self.invert(batch, cond_source, null)
        plan = self.plan(sources, targets)
        # Rows per input: [source, target]; without controls a real input's source row cannot reach its target,
        # and the input image is the real one, so the target samples alone.
        members = 2 if plan is not None or batch.images is None else 1

        def rows(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            """Per-input B x ... tensors -> the sampler's rows (input, member), B * members x ..."""
            return torch.stack([source, target], 1).flatten(0, 1) if members == 2 else target

        cond = rows(cond_source, cond_target)
        # Each input's null embedding (one, or null-text's per step) serves both its rows.
        uncond = null.repeat_interleave(members, 0)
        if inversion.uncond is not None:
            uncond = [u.repeat_interleave(members, 0) for u in inversion.uncond]
        hooks, before_step = self.controls(plan, inversion, size) if plan is not None else ((), None)

        def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
            x = x.view(size, members, *x.shape[1:])  # B x members x C x h x w
            if inversion.offsets is not None and members == 2:  # direct inversion: the source back on its trajectory
                x = torch.stack([x[:, 0] + inversion.offsets[i], x[:, 1]], 1)
            if self.word_maps is not None and plan is not None and i >= self.blend_start:
                x = self.blend(x)
            return x.flatten(0, 1)

        with self.control.using(*hooks):
            x_0 = denoise(bb, inversion.x_T.repeat_interleave(members, 0), cond, uncond, w, steps,
                          before_step=before_step, after_step=after_step)
        x_0 = x_0.view(size, members, *x_0.shape[1:])  # B x members x C x h x w
        edited = bb.decode_latents(x_0[:, -1])
        inputs = batch.images.float() if batch.images is not None else bb.decode_latents(x_0[:, 0])
        finite = finite_rows(*x_0.unbind(1))
        if bb.device.type == "cuda":
            torch.cuda.synchronize(bb.device)
        records = [{**({"inversion": inversion.records[b]} if inversion.records else {}), **self.record(plan, b)}
                   for b in range(size)]
        unet_evals = inversion.unet_evals + members * 2 * steps  # rows x guidance halves x steps
        return EditResult(inputs.cpu(), edited.cpu(), finite.cpu(), unet_evals, time.perf_counter() - start,
                          records=records)

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """LocalBlend (nt.ipynb, pnp) on latents B x 2 x C x h x w: each row's word maps, max-pooled 3 x 3,
        nearest-upsampled to the latents, over `blend_threshold` times their maximum (maps / max > threshold;
        a map of no words is empty); the target's mask also takes the source's, and outside it the target's
        latents become the source's."""
        size, side = x.shape[0], self.word_maps.side
        maps = self.word_maps.total.view(size, 2, side, side)
        maps = F.interpolate(F.max_pool2d(maps, 3, stride=1, padding=1), size=x.shape[-2:], mode="nearest")
        mask = maps > self.blend_threshold * maps.amax(dim=(2, 3), keepdim=True)  # B x 2 x h x w
        mask = (mask[:, 1] | mask[:, 0])[:, None]  # B x 1 x h x w: mask_tgt |= mask_src
        # The official z_src + mask (z_tgt - z_src) for a binary mask, without its rounding: all ones is a no-op.
        source, target = x[:, 0], x[:, 1]
        return torch.stack([source, torch.where(mask, target, source)], 1)
