"""Prompt-to-Prompt and DDIM word swap on tiny random components (EDITORS.md section 1's offline tests)."""
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import datagen.editors.p2p as p2p
from datagen.attention import MapInjection, MapRecorder, controlled_processors
from datagen.backbone import tiny_backbone
from datagen.editors.base import EditBatch, denoise, initial_noise
from datagen.editors.p2p import PromptToPrompt, blend_side, blend_words, cross_map_edit, cross_map_sides
from datagen.editors.word_swap import WordSwap
from datagen.inversions import make_inverter
from datagen.prompts import refine_alignment, replace_mapper

CONF = Path(__file__).resolve().parents[1] / "conf" / "editor"
RESOLUTION = 32  # 16 x 16 latents; the tiny UNet's attention runs at 8 x 8
STEPS = 4
SOURCES = ["a cat on a sofa", "a cat on a sofa", "a photo of a cat on a sofa"]
TARGETS = ["a dog on a sofa", "a fluffy cat on a sofa", "a photo of a tiger on a sofa"]  # replace, refine, replace
# Batches and single runs differ by float rounding (the UNet's batch size, fused vs explicit attention):
# measured ~1e-6 on the images.
ATOL = 2e-5
BLEND = 0.96  # a LocalBlend threshold that masks on this random UNet's near-uniform maps (see the all-ones test)


def inversions() -> list[str]:
    """The inversions that import (colleagues add them one by one)."""
    names = []
    for name in ("ddim", "null_text", "negative_prompt", "direct"):
        try:
            make_inverter(name)
        except ImportError:
            continue
        names.append(name)
    return names


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(seed=0).to(torch.device("cpu"), torch.float32)


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))


def plain_samples(backbone, prompts):
    """The prompts' images sampled from seeds 0, 1, ... without any controller."""
    x_T, null = initial_noise(backbone, list(range(len(prompts))), RESOLUTION), backbone.encode_text([""] * len(prompts))
    return backbone.decode_latents(denoise(backbone, x_T, backbone.encode_text(prompts), null, 7.5, STEPS))


def run(editor, count=2, seeds=None, real=False, sources=SOURCES, targets=TARGETS):
    seeds = list(range(count)) if seeds is None else seeds
    return editor.edit(EditBatch(seeds, sources[:count], images(count) if real else None, targets[:count]))


@pytest.mark.parametrize("mode, reweight, cross, self_", [
    ("replace", None, 1.0, 1.0), ("refine", None, (0.2, 0.8), (0.25, 0.75)),
    ("replace", {"sofa": 1.0}, (0.2, 0.8), 1.0), ("refine", {"on": 1.0, "sofa": 1.0}, 1.0, (0.25, 0.75))])
def test_identical_prompts_reproduce_the_source(backbone, mode, reweight, cross, self_):
    editor = PromptToPrompt(backbone, RESOLUTION, STEPS, mode=mode, reweight=reweight, cross_replace_steps=cross,
                            self_replace_steps=self_)
    result = run(editor, targets=SOURCES)
    assert torch.equal(result.edited, result.inputs)
    edited = run(editor, sources=SOURCES[::2], targets=TARGETS[::2])  # negative control: different prompts do edit
    assert (edited.edited - edited.inputs).abs().amax() > 0.01


def test_source_row_is_a_plain_denoise(backbone):
    """The source row is never edited: it is the source prompt's sample without any controller."""
    editor = PromptToPrompt(backbone, RESOLUTION, STEPS, local_blend=True, blend_threshold=BLEND, blend_start=0.0,
                            reweight={"sofa": 2.0})
    result = run(editor, 3)
    torch.testing.assert_close(result.inputs, plain_samples(backbone, SOURCES), atol=ATOL, rtol=0)
    assert (result.edited - result.inputs).abs().amax() > 0.01
    assert result.unet_evals == 2 * 2 * STEPS


def test_word_swap_is_p2p_without_controls(backbone):
    """cross = self = 0 and no blend: the target is word swap's edit, the target prompt sampled from the same x_T."""
    p2p_off = run(PromptToPrompt(backbone, RESOLUTION, STEPS, cross_replace_steps=0.0, self_replace_steps=0.0), 3)
    swap = run(WordSwap(backbone, RESOLUTION, STEPS), 3)
    torch.testing.assert_close(p2p_off.edited, swap.edited, atol=ATOL, rtol=0)
    torch.testing.assert_close(p2p_off.inputs, swap.inputs, atol=ATOL, rtol=0)
    torch.testing.assert_close(swap.edited, plain_samples(backbone, TARGETS), atol=ATOL, rtol=0)
    assert swap.unet_evals == 2 * 2 * STEPS and swap.records == [{}] * 3
    edited = run(PromptToPrompt(backbone, RESOLUTION, STEPS), 3)  # negative control: the controls change the target
    assert (edited.edited - swap.edited).abs().amax() > 100 * ATOL


@pytest.mark.parametrize("halves", ["cond", "uncond", "both"])
def test_injection_edits_only_the_halves_it_is_asked_to(backbone, halves):
    """One guided forward of one input's [source, target] rows with different latents, maps recorded after the
    injection (a MapRecorder beside it) and without it."""
    control, processors = controlled_processors(backbone.unet)
    backbone.unet.set_attn_processor(dict(processors))
    source, target = "a cat on a sofa", "a dog on a sofa"
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # source, target
    x = torch.cat([z, z])  # rows (half, member)
    context = torch.cat([backbone.encode_text(["", ""]), backbone.encode_text([source, target])])
    edit = cross_map_edit([replace_mapper(source, target, backbone.tokenizer)], None, backbone.device, backbone.dtype)
    injection = MapInjection(edit, halves=halves, cross_alpha=torch.ones(1, 77), self_active=True)

    def maps(*hooks):
        recorder = MapRecorder(where=lambda site, queries: True)
        with control.using(*hooks, recorder), torch.no_grad():
            backbone.unet(x, 500, encoder_hidden_states=context)
        return {name: probs.view(2, 2, *probs.shape[1:]) for name, probs in recorder.maps.items()}  # half, member

    plain, injected = maps(), maps(injection)
    assert len(plain) == 12 and any(name.endswith("attn1") for name in plain)  # every cross and self layer
    for half in (0, 1):
        edited = half in {"uncond": {0}, "cond": {1}, "both": {0, 1}}[halves]
        for name in plain:
            assert torch.equal(injected[name][half, 0], plain[name][half, 0]), name  # the source is never edited
            if edited:  # replace with equal token counts is the identity mapper: the target takes the source's maps
                torch.testing.assert_close(injected[name][half, 1], injected[name][half, 0], atol=1e-6, rtol=0)
            else:
                assert torch.equal(injected[name][half, 1], plain[name][half, 1]), name
        changed = max((injected[name][half, 1] - plain[name][half, 1]).abs().amax() for name in plain)
        assert (changed > 1e-3) == edited  # an edited half did change


@dataclass(eq=False)
class SpyInjection(MapInjection):
    """Logs each call: (UNet forward so far, cross, queries, whether the target rows changed)."""

    calls: list = field(default_factory=list)
    forwards: list = field(default_factory=list)

    def __call__(self, site, probs):
        out = super().__call__(site, probs)
        cond = probs.shape[0] // 2
        self.calls.append((len(self.forwards) - 1, site.cross, probs.shape[2],
                           not torch.equal(out[cond + 1 :: 2], probs[cond + 1 :: 2])))
        return out


def test_schedules_reach_the_hooks():
    """N = 10, cross 0.4: maps replaced at steps 0-3 only (int(0.4 x 11) = 4 rows); self 0.3 at steps 0-2, only
    at layers of at most self_max_queries queries. A UNet with attention at 8 x 8 (64 queries) and 4 x 4 (16)."""
    backbone = tiny_backbone(seed=0, unet_channels=(32, 64, 64)).to(torch.device("cpu"), torch.float32)
    for max_queries, self_queries in ((16, {16}), (64, {16, 64})):
        editor = PromptToPrompt(backbone, RESOLUTION, 10, cross_replace_steps=0.4, self_replace_steps=0.3,
                                self_max_queries=max_queries)
        spy = editor.injection = SpyInjection(self_max_queries=max_queries)
        handle = backbone.unet.register_forward_pre_hook(lambda module, args: spy.forwards.append(None))
        try:
            run(editor, 1)
        finally:
            handle.remove()
        assert len(spy.forwards) == 10
        cross = [(step, changed) for step, is_cross, _, changed in spy.calls if is_cross]
        assert {step for step, _ in cross} == {0, 1, 2, 3} and all(changed for _, changed in cross)
        self_calls = [(step, queries, changed) for step, is_cross, queries, changed in spy.calls if not is_cross]
        assert {step for step, _, _ in self_calls} == {0, 1, 2}
        # At step 0 both rows hold x_T, so maps before the first cross-attention are equal already: some change.
        assert {queries for _, queries, _ in self_calls} == self_queries and any(changed for *_, changed in self_calls)


def test_local_blend_mask():
    """On set maps: pooled 3 x 3, upsampled, over 0.3 x max; the target keeps the source's mask too; outside,
    the target's latents are the source's; an empty map (an absent word) collapses the target onto the source."""
    editor = PromptToPrompt.__new__(PromptToPrompt)
    editor.word_maps, editor.blend_threshold = p2p.WordMaps(side=4), 0.3
    maps = torch.zeros(2, 2, 4, 4)  # input, member
    maps[0, 0, 0, 0] = 1.0  # input 0: the source's word at the top left, the target's at the bottom right
    maps[0, 1, 3, 3] = 1.0
    maps[1, 0, 1, 1] = 1.0  # input 1: the target's word is absent
    editor.word_maps.total = maps.flatten(0, 1).flatten(1)
    x = torch.randn(2, 2, 4, 8, 8)
    out = editor.blend(x)
    assert torch.equal(out[:, 0], x[:, 0])
    region = torch.zeros(8, 8, dtype=torch.bool)  # 3 x 3 pooling: 2 x 2 map cells, nearest-upsampled x 2
    region[:4, :4] = region[4:, 4:] = True
    assert torch.equal(out[0, 1], torch.where(region, x[0, 1], x[0, 0]))
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:6, :6] = True  # the source's mask alone
    assert torch.equal(out[1, 1], torch.where(region, x[1, 1], x[1, 0]))
    editor.word_maps.total = torch.zeros(4, 16)
    assert torch.equal(editor.blend(x)[:, 1], x[:, 0])


def test_all_ones_blend_mask_is_a_noop(backbone):
    """Threshold 0: every pooled map is positive (softmax), the mask is all ones and the run is the unblended one, to
    the bit: cross replacement at every step makes both runs compute the same explicit maps where LocalBlend reads."""
    kwargs = dict(cross_replace_steps=1.0, self_replace_steps=0.5)
    plain = run(PromptToPrompt(backbone, RESOLUTION, STEPS, **kwargs), 3)
    kwargs.update(blend_start=0.0)
    ones = run(PromptToPrompt(backbone, RESOLUTION, STEPS, local_blend=True, blend_threshold=0.0, **kwargs), 3)
    assert torch.equal(ones.edited, plain.edited) and torch.equal(ones.inputs, plain.inputs)
    # Negative control: a threshold that masks. This random UNet's maps are near uniform: pooled, their minimum is
    # ~0.92 of their maximum, so the default 0.3 masks everything in too.
    blended = run(PromptToPrompt(backbone, RESOLUTION, STEPS, local_blend=True, blend_threshold=BLEND, **kwargs), 3)
    assert (blended.edited - plain.edited).abs().amax() > 0.01
    assert [record["p2p"] for record in blended.records] == [
        {"mode": "replace", "blend_words": [["cat"], ["dog"]]}, {"mode": "refine", "blend_words": [[], ["fluffy"]]},
        {"mode": "replace", "blend_words": [["cat"], ["tiger"]]}]


def test_batch_equals_one_at_a_time(backbone):
    """Three inputs mixing replace and refine, reweighted and blended: the batch is its inputs run alone."""
    editor = PromptToPrompt(backbone, RESOLUTION, STEPS, reweight={"sofa": 2.0}, local_blend=True, blend_threshold=BLEND,
                            blend_start=0.25)
    seeds = [5, 6, 7]
    batch = run(editor, 3, seeds)
    for i in range(3):
        single = editor.edit(EditBatch(seeds[i : i + 1], SOURCES[i : i + 1], None, TARGETS[i : i + 1]))
        torch.testing.assert_close(batch.edited[i : i + 1], single.edited, atol=ATOL, rtol=0)
        torch.testing.assert_close(batch.inputs[i : i + 1], single.inputs, atol=ATOL, rtol=0)
        assert single.records == batch.records[i : i + 1] and single.unet_evals == batch.unet_evals
    # Control: the tolerance is tight. Input 0 with input 1's target prompt (one more word) is another edit.
    swapped = editor.edit(EditBatch(seeds, SOURCES, None, [TARGETS[1], TARGETS[0], TARGETS[2]]))
    assert (swapped.edited[0] - batch.edited[0]).abs().amax() > 100 * ATOL


def test_rows_are_deterministic(backbone):
    for editor in (PromptToPrompt(backbone, RESOLUTION, STEPS, local_blend=True), WordSwap(backbone, RESOLUTION, STEPS)):
        first, again, other = run(editor, 2, [3, 4]), run(editor, 2, [3, 4]), run(editor, 2, [3, 5])
        assert torch.equal(first.edited, again.edited) and torch.equal(first.inputs, again.inputs)
        torch.testing.assert_close(first.edited[0], other.edited[0], atol=ATOL, rtol=0)  # a seed is its input's own
        assert (first.edited[1] - other.edited[1]).abs().amax() > 100 * ATOL


@pytest.mark.parametrize("inversion", inversions())
def test_real_inputs(backbone, inversion, finals):
    """Real inputs through each inversion. Word swap skips the source row (2 UNet forwards per step fewer), and
    with cross = self = 0 and no blend P2P's target is word swap's. Direct inversion keeps the source row on the
    inversion trajectory (it lands on the image's latents) and leaves the target alone."""
    options = {"inner_steps": 2} if inversion == "null_text" else {}
    kwargs = dict(inversion=inversion, inversion_options=options)
    edited = run(PromptToPrompt(backbone, RESOLUTION, STEPS, local_blend=True, **kwargs), real=True)
    kwargs_off = dict(cross_replace_steps=0.0, self_replace_steps=0.0, **kwargs)
    off = run(PromptToPrompt(backbone, RESOLUTION, STEPS, **kwargs_off), real=True)
    swap = run(WordSwap(backbone, RESOLUTION, STEPS, **kwargs), real=True)
    for result in (edited, off, swap):
        assert torch.equal(result.inputs, images(2)) and result.finite.all()
        assert [record["inversion"]["method"] for record in result.records] == [inversion] * 2
    torch.testing.assert_close(off.edited, swap.edited, atol=ATOL, rtol=0)
    assert (edited.edited - swap.edited).abs().amax() > 100 * ATOL  # negative control
    assert edited.unet_evals == off.unet_evals == swap.unet_evals + 2 * STEPS
    assert [finals[-1].shape[0], finals[0].shape[0]] == [2, 4]  # word swap: target rows only
    # Direct: ~4e-4 (latents up to 0.16 here), not exactly: the offsets were measured on B source rows, and these
    # rows sample among 2B with explicit attention, a float-rounding difference (~1e-6 in the UNet) that guidance 7.5
    # on a random UNet amplifies. The other inversions' source rows miss the image by ~5.
    source_rows = finals[0][0::2]
    reconstruction = (source_rows - backbone.encode_images(images(2) * 2 - 1)).abs().amax()
    assert (reconstruction < 1e-2) == (inversion == "direct")


@pytest.mark.skipif("direct" not in inversions(), reason="direct inversion does not import")
def test_half_precision(finals):
    """The UNet in bf16, the trajectory in fp32 (as base.denoise), every control on, real inputs with direct inversion."""
    backbone = tiny_backbone(seed=0).to(torch.device("cpu"), torch.bfloat16)
    editor = PromptToPrompt(backbone, RESOLUTION, STEPS, reweight={"sofa": 2.0}, local_blend=True, inversion="direct")
    result = run(editor, 3, real=True)
    assert finals[0].dtype == torch.float32 and result.edited.dtype == torch.float32 and result.finite.all()


def test_cross_map_edit_mixed_batch_equals_each_mode(backbone):
    """A batch mixing replace and refine inputs writes refines as matrices: the same maps as the gather."""
    tokenizer = backbone.tokenizer
    replace = replace_mapper("a cat on a sofa", "a dog on a sofa", tokenizer)
    refine = refine_alignment("a cat on a sofa", "a fluffy cat on a big sofa", tokenizer)
    reweight = torch.rand(2, 77) + 0.5
    source, target = torch.rand(2, 2, 2, 9, 77).unbind(0)  # input x heads x queries x 77 each
    cpu = torch.device("cpu")
    mixed = cross_map_edit([replace, refine], reweight, cpu, torch.float32)(source, target)
    alone = [cross_map_edit([edit], reweight[b : b + 1], cpu, torch.float32)(source[b : b + 1], target[b : b + 1])
             for b, edit in enumerate([replace, refine])]
    assert mixed.shape == source.shape and (refine[1] == 0).any()  # the refine inserts tokens: its keep is used
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-6, rtol=0)


def test_blend_words():
    assert blend_words("a cat on a sofa", "a dog on a sofa") == (["cat"], ["dog"])
    assert blend_words("A cat on a sofa.", "a fluffy cat on a sofa") == ([], ["fluffy"])  # case, punctuation
    assert blend_words("a cat on a sofa", "an elephant on a sofa") == (["cat"], ["elephant"])  # no articles
    assert blend_words("a cat", "a cat") == ([], [])


def test_blend_side():
    """SD: the 16 x 16 layers of a 64 x 64 latent; the toy world's 16 x 16 latents: its 8 x 8 layers (latent / 4 = 4
    is its mid block's, which LocalBlend leaves out); the tiny UNet's only side."""
    sd = SimpleNamespace(config=SimpleNamespace(
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    assert cross_map_sides(sd, 64) == [16, 32, 64] and blend_side(sd, 64) == 16 and blend_side(sd, 96) == 24
    assert blend_side(sd, 64, 20) == 16 and blend_side(sd, 64, 24) == 32  # nearest, the larger on a tie
    toy = SimpleNamespace(config=OmegaConf.load(Path(__file__).resolve().parents[1] / "toyworld/weights/unet/config.json"))
    assert cross_map_sides(toy, 16) == [8, 16] and blend_side(toy, 16) == 8
    assert cross_map_sides(tiny_backbone(seed=0).unet, 16) == [8]


def test_configs_build_the_editors(backbone):
    """conf/editor/*.yaml build the editors as the worker does; `editor.inversion=direct` is a plain override."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "p2p.yaml"), OmegaConf.from_dotlist(
        ["inversion=direct", "local_blend=true", "cross_replace_steps={default_: [0, 0.5], cat: 0.2}", "reweight={cat: 2}"]))
    editor = instantiate(cfg, _partial_=True)(backbone=backbone, resolution=RESOLUTION, compile=False)
    assert isinstance(editor, PromptToPrompt) and editor.inverter.name == "direct" and PromptToPrompt.uses_target_prompts
    assert editor.cross_replace_steps == {"default_": (0.0, 0.5), "cat": 0.2} and editor.reweight == {"cat": 2.0}
    assert (editor.num_inference_steps, editor.guidance_scale, editor.self_steps) == (50, 7.5, range(0, 20))
    assert editor.word_maps.side == 8 and editor.injection.self_max_queries == 1024 and editor.blend_start == 10
    plan = editor.plan(["a cat on a sofa"], ["a cat on a big sofa"])
    assert plan.cross_on[:26] == [True] * 25 + [False]  # int(0.5 x 51) = 25 rows
    swap = instantiate(OmegaConf.load(CONF / "word_swap.yaml"), _partial_=True)(
        backbone=backbone, resolution=RESOLUTION, compile=False)
    assert isinstance(swap, WordSwap) and swap.inverter.name == "ddim" and swap.plan(["a cat"], ["a dog"]) is None


def test_rejects_what_it_cannot_run(backbone):
    for bad in ({"mode": "swap"}, {"halves": "neither"}, {"guidance_scale": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PromptToPrompt(backbone, RESOLUTION, STEPS, **bad)
    with pytest.raises(ValueError, match="target_prompts"):
        PromptToPrompt(backbone, RESOLUTION, STEPS).edit(EditBatch([0], ["a cat"]))
    with pytest.raises(ValueError, match="as many words"):  # replace needs a word-for-word pair
        run(PromptToPrompt(backbone, RESOLUTION, STEPS, mode="replace"), 2)
