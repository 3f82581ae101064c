"""StyleDiffusion's inversion and editor (STYLEDIFFUSION.md section 6) on tiny random components, and its
reconstruction on the trained toy UNet."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torchvision.utils import save_image

import datagen.config  # noqa: F401  (the ${repo:} resolver)
import datagen.editors.p2p as p2p
import datagen.inversions.stylediffusion as stylediffusion
from datagen.attention import MapInjection, MapRecorder, ValueModulation, controlled_processors
from datagen.backbone import Backbone, load_backbone, tiny_backbone
from datagen.editors.base import EditBatch, denoise
from datagen.editors.p2p import blend_side
from datagen.editors.stylediffusion import StyleDiffusion
from datagen.image_tokens import image_tokens_for
from datagen.inversions import Inversion
from datagen.inversions.ddim import ddim_trajectory
from datagen.inversions.stylediffusion import (MapHistory, MappingNetworks, StyleDiffusionInversion, SupervisedLayers,
                                               inner_step_counts)
from toyworld.models import WEIGHTS
from toyworld.render import render
from toyworld.world import captions, sample_scenes

CONF = Path(__file__).resolve().parents[1] / "conf"
RESOLUTION = 32  # 16 x 16 latents; the tiny UNet's cross-attention runs at 8 x 8
STEPS = 3
INNER = 5  # K_i = ceil(5 exp(-0.1 i)): 5, 5, 5
SOURCES = ["a red circle on a sofa", "a blue square on a sofa"]
TARGETS = ["a red square on a sofa", "a blue circle on a sofa"]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return tiny_backbone(seed=0).to(torch.device("cpu"), torch.float32)


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


@dataclass
class World:
    backbone: Backbone
    latents: torch.Tensor
    cond: torch.Tensor
    null: torch.Tensor
    tokens: torch.Tensor

    def invert(self, rows: slice = slice(None), steps: int = STEPS, **options) -> Inversion:
        """Images `rows`, each with its own generator (seed = its index)."""
        options = {"inner_steps": INNER, **options}
        seeds = range(len(self.latents))[rows]
        return StyleDiffusionInversion(**options)(self.backbone, self.latents[rows], self.cond[rows], self.null[rows],
                                                  steps, 7.5, [torch.Generator().manual_seed(s) for s in seeds],
                                                  image_tokens=self.tokens[rows])


def make_world(backbone: Backbone, inputs: torch.Tensor, prompts: list[str]) -> World:
    return World(backbone, backbone.encode_images(inputs * 2 - 1), backbone.encode_text(prompts),
                 backbone.encode_text([""] * len(prompts)), image_tokens_for(backbone)(inputs))


@pytest.fixture(scope="module")
def world(backbone) -> World:
    return make_world(backbone, images(), SOURCES)


def replay(backbone: Backbone, inversion: Inversion, cond: torch.Tensor, null: torch.Tensor, steps: int = STEPS,
           hooks=()) -> list[torch.Tensor]:
    """Guided sampling from x_T with the stored value input on the conditional half (the unconditional keeps c):
    the latents after each step."""
    control, processors = controlled_processors(backbone.unet)
    backbone.unet.set_attn_processor(dict(processors))
    modulation = ValueModulation()

    def before_step(i: int) -> None:
        scale, shift = inversion.values[i]
        modulation.scale = torch.cat([torch.ones_like(scale), scale])
        modulation.shift = torch.cat([torch.zeros_like(shift), shift])

    visited: list[torch.Tensor] = []

    def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
        visited.append(x)
        return x

    with control.using(modulation, *hooks):
        denoise(backbone, inversion.x_T, cond, null, 7.5, steps, before_step=before_step, after_step=after_step)
    return visited


@pytest.fixture(scope="module")
def inverted(world) -> tuple[Inversion, list[torch.Tensor]]:
    """The inversion of the two images, and z~ after each of its steps (its guided steps without gradients)."""
    scheduler, visited = world.backbone.scheduler, []
    step = scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        if not torch.is_grad_enabled():
            visited.append(out.prev_sample)
        return out

    scheduler.step = recording_step
    try:
        inversion = world.invert()
    finally:
        del scheduler.step
    return inversion, visited


def error(x: torch.Tensor, latents: torch.Tensor) -> float:
    return (x - latents).square().mean().item()


def test_inner_step_schedule():
    counts = inner_step_counts(30, 100, 0.1)
    assert counts[:4] == [100, 91, 82, 75] and counts[-1] == 6 and sum(counts) == 1015


def test_reconstruction_beats_ddim_with_cfg(world, inverted):
    """The random tiny UNet barely listens to its text, so the value input has little to steer with: 1.25x
    measured at 5 inner steps (no updates: 1.0)."""
    inversion, _ = inverted
    ddim = error(denoise(world.backbone, inversion.x_T, world.cond, world.null, 7.5, STEPS), world.latents)
    ours = error(replay(world.backbone, inversion, world.cond, world.null)[-1], world.latents)
    print(f"DDIM + CFG / StyleDiffusion reconstruction MSE: {ddim:.4g} / {ours:.4g} = {ddim / ours:.3g}")
    assert ddim / ours > 1.15
    for record in inversion.records:
        assert record["inner_steps"] == [INNER] * STEPS and record["unet_backwards"] == INNER * STEPS
        assert record["unet_evals"] == STEPS + STEPS * (2 + INNER)
        assert all(final <= first for final, first in zip(record["final_loss"], record["first_loss"])), record
        assert record["final_loss"][0] < 0.7 * record["first_loss"][0]  # step 0 has far to go, and goes


@pytest.mark.skipif(not (WEIGHTS / "unet").exists(), reason="toyworld/weights not trained yet")
def test_reconstruction_of_rendered_scenes_far_better_than_ddim_with_cfg():
    """The trained toy UNet, 10 steps, the code's K_i at a fifth (20, 19, ..., 9): 7.4x measured (12 inner
    steps: 4.0x; null-text inversion at 10 steps: 7.9x, tests/test_inversions.py)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=["task=circle2square", "model=toy"])
    backbone = load_backbone(cfg.model, "cpu")
    scenes = sample_scenes(2, 2024, two_object_prob=0.0, held_out="any")
    renders, _ = render(scenes, torch.device("cpu"))
    toy = make_world(backbone, renders, captions(scenes, None))
    inversion = toy.invert(steps=10, inner_steps=20)
    ddim = error(denoise(backbone, inversion.x_T, toy.cond, toy.null, 7.5, 10), toy.latents)
    ours = error(replay(backbone, inversion, toy.cond, toy.null, 10)[-1], toy.latents)
    print(f"toy: DDIM + CFG / StyleDiffusion reconstruction MSE: {ddim:.4g} / {ours:.4g} = {ddim / ours:.3g}")
    assert ddim / ours > 4


# The inversion runs each guidance half as its own UNet call, sampling runs them as one batch: their rounding
# (~3e-6 in the noise) comes out x 7.5 in a guided step, 2-4e-5 in the latents on the random UNet.
REPLAY_ATOL = 1e-4


def test_replay_retraces_the_optimised_trajectory(world, inverted):
    inversion, visited = inverted
    assert len(visited) == STEPS and len(inversion.values) == STEPS
    for i, (ours, theirs) in enumerate(zip(replay(world.backbone, inversion, world.cond, world.null), visited)):
        torch.testing.assert_close(ours, theirs, atol=REPLAY_ATOL, rtol=0, msg=f"step {i}")
    # controls: without the value input, or with each step's a step late, the same x_T lands elsewhere
    plain = denoise(world.backbone, inversion.x_T, world.cond, world.null, 7.5, STEPS)
    late = replay(world.backbone, replace(inversion, values=inversion.values[:1] + inversion.values[:-1]), world.cond,
                  world.null)[-1]
    assert min((plain - visited[-1]).abs().amax(), (late - visited[-1]).abs().amax()) > 100 * REPLAY_ATOL


def test_edit_batch_source_rows_replay_the_inversion(backbone, finals, monkeypatch):
    """Each input's source row of an edit batch (P2P, P2Plus, LocalBlend and the target beside it) lands where the
    stored value input alone takes it."""
    editor = StyleDiffusion(backbone, RESOLUTION, STEPS, blend_start=0.0, inversion_options={"inner_steps": INNER})
    made: list[Inversion] = []
    invert = editor.invert
    monkeypatch.setattr(editor, "invert", lambda *args: made.append(invert(*args)) or made[-1])
    result = editor.edit(EditBatch([0, 1], SOURCES, images(), TARGETS))
    x_0 = finals[-1].view(2, 2, *finals[-1].shape[1:])
    alone = replay(editor.backbone, made[0], backbone.encode_text(SOURCES), backbone.encode_text(["", ""]))[-1]
    torch.testing.assert_close(x_0[:, 0], alone, atol=REPLAY_ATOL, rtol=0)
    assert (x_0[:, 1] - x_0[:, 0]).abs().amax() > 1e-2  # the targets did edit
    assert result.records[0]["inversion"]["cached"] is False and result.records[0]["p2p"]["mode"] == "replace"


@pytest.mark.parametrize("tau_c, tau_s, tau_u, blend", [(1.0, 1.0, 1.0, False), (0.4, 0.5, 0.3, True),
                                                         (0.0, 0.0, 0.0, True)])
def test_identical_prompts_reproduce_the_source(backbone, finals, tmp_path_factory, tau_c, tau_s, tau_u, blend):
    cache = tmp_path_factory.getbasetemp() / "identity-cache"  # one inversion for every case
    options = dict(cross_replace_steps=tau_c, self_replace_steps=tau_s, uncond_self_replace_steps=tau_u,
                   local_blend=blend, blend_start=0.0, inversion_options={"inner_steps": INNER}, cache_dir=cache)
    batch = EditBatch([0, 1], SOURCES, images(), SOURCES)
    # tau_v < 1: the target's value input goes plain from step 1 and it moves (step 2, at t = 0, is the identity);
    # with LocalBlend on, identical prompts change no words: the mask is empty and the target is the source anyway
    for tau_v, identity in ((1.0, True),) + (() if blend else ((0.3, False),)):
        StyleDiffusion(backbone, RESOLUTION, STEPS, value_steps=tau_v, **options).edit(batch)
        x_0 = finals[-1].view(2, 2, *finals[-1].shape[1:])
        moved = (x_0[:, 1] - x_0[:, 0]).abs().amax().item()
        assert (moved <= 1e-6) == identity, (tau_v, moved)


@dataclass(eq=False)
class SpyInjection(MapInjection):
    """Logs each call: (step, cross, queries, whether the unconditional target rows changed, whether any other did)."""

    step: list = field(default_factory=lambda: [None])
    calls: list = field(default_factory=list)

    def __call__(self, site, probs):
        out = super().__call__(site, probs)
        half = probs.shape[0] // 2  # rows (half, input, member)
        target = torch.zeros(probs.shape[0], dtype=torch.bool)
        target[1:half:2] = True
        self.calls.append((self.step[0], site.cross, probs.shape[2], not torch.equal(out[target], probs[target]),
                           not torch.equal(out[~target], probs[~target])))
        if self.calls[-1][3]:  # the edited target rows are the source's
            assert torch.equal(out[1:half:2], out[0:half:2])
        return out


@dataclass(eq=False)
class SpyModulation(ValueModulation):
    """Logs per step whether each conditional target row has its source's value input and the unconditional half c."""

    step: list = field(default_factory=lambda: [None])
    calls: dict = field(default_factory=dict)

    def value_input(self, site, context):
        half = self.scale.shape[0] // 2
        uncond_plain = bool((self.scale[:half] == 1).all() and (self.shift[:half] == 0).all())
        target_modulated = torch.equal(self.scale[half + 1 :: 2], self.scale[half::2])
        target_plain = bool((self.scale[half + 1 :: 2] == 1).all() and (self.shift[half + 1 :: 2] == 0).all())
        self.calls.setdefault(self.step[0], set()).add((uncond_plain, target_modulated, target_plain))
        return super().value_input(site, context)


def test_schedules_reach_the_hooks(monkeypatch):
    """N = 10 with self-attention at 8 x 8 (64 queries) and 4 x 4 (16): tau_u 0.3 swaps the unconditional target's
    self-attention for the source's at steps 0-2, at the 16-query layers only, and never touches cross-attention or
    the conditional half; tau_v 0.6 modulates the target's value input at steps 0-5, then leaves it plain."""
    backbone = tiny_backbone(seed=0, unet_channels=(32, 64, 64)).to(torch.device("cpu"), torch.float32)
    editor = StyleDiffusion(backbone, RESOLUTION, 10, value_steps=0.6, uncond_self_replace_steps=0.3,
                            self_max_queries=16, inversion_options={"inner_steps": 1})
    step = [None]
    spy = editor.uncond_injection = SpyInjection(halves="uncond", self_max_queries=16, step=step)
    values = editor.values = SpyModulation(step=step)
    controls = editor.controls

    def spied_controls(plan, inversion, size):
        hooks, before_step = controls(plan, inversion, size)
        return hooks, lambda i: (step.__setitem__(0, i), before_step(i))

    monkeypatch.setattr(editor, "controls", spied_controls)
    editor.edit(EditBatch([0], SOURCES[:1], images(1), TARGETS[:1]))
    assert not any(cross for _, cross, _, _, _ in spy.calls)  # unconditional cross-attention is never read
    assert {queries for _, _, queries, _, _ in spy.calls} == {16}
    assert {i for i, *_ in spy.calls} == {0, 1, 2}
    # at step 0 both rows are x_T and their unconditional halves agree already: the swap changes nothing there
    assert {i for i, _, _, changed, _ in spy.calls if changed} == {1, 2}
    assert not any(other for *_, other in spy.calls)  # the source rows and the conditional half stay as they were
    assert sorted(values.calls) == list(range(10))
    for i, seen in values.calls.items():
        assert seen == {(True, i < 6, i >= 6)}, (i, seen)


def test_config_defaults_and_presets(backbone):
    """conf/editor/stylediffusion.yaml (the official CLI) at N = 30, and the README presets."""
    def editor(name: str) -> StyleDiffusion:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="generate", overrides=[f"editor={name}"]).editor
        return instantiate(cfg, _partial_=True)(backbone=backbone, resolution=RESOLUTION)

    default = editor("stylediffusion")
    assert default.num_inference_steps == 30 and default.guidance_scale == 7.5
    default.backbone.scheduler.set_timesteps(30)
    assert default.backbone.scheduler.timesteps.tolist() == [957 - 33 * i for i in range(30)]  # steps_offset 0
    assert backbone.scheduler.config.steps_offset == 1  # the model's own scheduler is left as it was
    plan = default.plan(SOURCES[:1], TARGETS[:1])
    assert [i for i, on in enumerate(plan.cross_on) if on] == list(range(18))  # tau_c .6: int(.6 x 31)
    assert default.self_steps == range(24) and default.uncond_self_steps == range(15)  # tau_s .8, tau_u .5
    assert [i for i in range(30) if i < default.value_steps * 30] == list(range(18))  # tau_v .6
    assert default.local_blend and default.blend_start == 6
    reweight = default.reweights(SOURCES[:1], TARGETS[:1])[0]  # the target's changed word x 2
    assert reweight.tolist().count(2.0) == 1 and reweight.tolist().count(1.0) == 76
    inverter = default.inverter
    assert (inverter.inner_steps, inverter.inner_decay, inverter.lr, inverter.betas) == (100, 0.1, 0.01, (0.9, 0.999))
    assert inverter.early_stop == (1e-5, 2e-5) and inverter.attention_weight == 1.0 and inverter.output == "film"
    style, structure = editor("stylediffusion_style"), editor("stylediffusion_structure")
    assert style.value_steps == 0.5 and style.self_steps == range(18) and style.uncond_self_steps == range(0)
    assert structure.value_steps == 0.5 and structure.uncond_self_steps == range(15)


def test_lr_betas_and_warm_start(world, monkeypatch):
    """Adam at lr 0.01 (1 - i / 100) with the code's betas, a new one per step, over parameters that start where
    the last step's ended: M_i's output when its Adam is made is (s, b)_{i-1}."""
    made: list[tuple[float, tuple, list[torch.Tensor]]] = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, lr, betas) -> None:
            params = list(params)
            made.append((lr, betas, [p.detach().clone() for p in params]))
            super().__init__(params, lr=lr, betas=betas)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    inversion = world.invert(early_stop=(1e9, 0.0))  # every loss is below: one update per step
    assert [lr for lr, _, _ in made] == pytest.approx([0.01 * (1 - i / 100) for i in range(STEPS)])
    assert all(betas == (0.9, 0.999) for _, betas, _ in made)
    assert all(record["inner_steps"] == [1] * STEPS for record in inversion.records)
    networks = MappingNetworks(generators(2), world.tokens.shape[1])
    rows = torch.arange(2)
    for i in range(1, STEPS):
        with torch.no_grad():
            for p, start in zip(networks.parameters(), made[i][2]):
                p.copy_(start)
            scale, shift = networks(world.tokens, rows)
        torch.testing.assert_close(scale, inversion.values[i - 1][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(shift, inversion.values[i - 1][1], atol=1e-6, rtol=0)
    assert not torch.equal(inversion.values[1][0], inversion.values[0][0])  # each step's update moved it


def test_mapping_networks_are_each_images_own(world):
    """Batched networks: an image's output depends on its own tokens and parameters only (BatchNorm statistics are
    per image: a BatchNorm1d over the batch would mix them), and equals its network built alone."""
    tokens = world.tokens
    networks, alone = MappingNetworks(generators(2), tokens.shape[1]), MappingNetworks(generators(1), tokens.shape[1])
    with torch.no_grad():
        scale, shift = networks(tokens, torch.arange(2))
        other = tokens.clone()
        other[1] = torch.randn_like(other[1]) * 3 + 1
        assert torch.equal(networks(other, torch.arange(2))[0][0], scale[0])
        torch.testing.assert_close(alone(tokens[:1], torch.arange(1))[0], scale[:1], atol=1e-6, rtol=0)
        # 78,540 at SD's 197 tokens: three convolutions with biases and the BatchNorm's affine pair
        assert sum(p[0].numel() for p in networks.parameters()) == 154 * 17 + 2 * 154 * 154 + 5 * 154


class CoupledNetworks(MappingNetworks):
    """The bug the batched networks must not have: BatchNorm statistics over the whole batch of images."""

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def conv(w, b, x):
            return torch.baddbmm(b[rows].unsqueeze(-1), w[rows], x)

        h = conv(self.w_mid, self.b_mid, conv(self.w_in, self.b_in, tokens))
        mean, var = h.mean((0, 2), keepdim=True), h.var((0, 2), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * self.bn_weight[rows].unsqueeze(-1) + self.bn_bias[rows].unsqueeze(-1)
        out = conv(self.w_out, self.b_out, torch.nn.functional.leaky_relu(h, 0.01))
        return out[:, :77], out[:, 77:]


def test_images_stop_on_their_own_loss_and_a_batch_is_one_at_a_time(monkeypatch):
    """In float64, where the UNet's batch-size rounding cannot show (in float32 Adam's normalised steps turn it into
    1e-3 .. 0.1 differences on the random UNet within 3 steps): the same values alone and in a batch, to 1e-9, with
    the images stopping at different inner steps; BatchNorm statistics over the batch break it by far."""
    backbone = tiny_backbone(seed=0).to(torch.device("cpu"), torch.float64)
    world = make_world(backbone, images().double(), SOURCES)
    first = world.invert(inner_steps=1, early_stop=(1e9, 0.0))
    threshold = sum(record["first_loss"][0] for record in first.records) / 2  # between the two images' step-0 losses
    options = dict(inner_steps=4, early_stop=(threshold, 0.0))

    def gap(batched: Inversion, b: int) -> tuple[float, list[int]]:
        """Image b alone: the largest difference of its x_T and value input from the batch's, and its inner steps."""
        alone = world.invert(slice(b, b + 1), **options)
        pairs = [(batched.x_T[b : b + 1], alone.x_T)] + [
            (ours[b : b + 1], theirs) for step, step_alone in zip(batched.values, alone.values)
            for ours, theirs in zip(step, step_alone)]
        return max((ours - theirs).abs().max().item() for ours, theirs in pairs), alone.records[0]["inner_steps"]

    batched = world.invert(**options)
    steps = [record["inner_steps"] for record in batched.records]
    assert steps[0] != steps[1], steps
    for b in range(2):
        difference, steps_alone = gap(batched, b)
        assert difference < 1e-9 and steps_alone == steps[b], (b, difference, steps_alone)
    monkeypatch.setattr(stylediffusion, "MappingNetworks", CoupledNetworks)
    assert gap(world.invert(**options), 0)[0] > 1e-2


def final_map_distance(world: World, inversion: Inversion) -> float:
    """Sum over the steps of the supervised layers' mean squared distance between the replayed conditional maps and
    the inversion's maps on the latent being denoised (A_{N-i}; step 0 the last call's), as the loss defines it."""
    bb, side = world.backbone, blend_side(world.backbone.unet, world.latents.shape[-1])
    control, processors = controlled_processors(bb.unet)
    bb.unet.set_attn_processor(dict(processors))
    targets = MapHistory(SupervisedLayers(side))
    with control.using(targets):
        ddim_trajectory(bb, world.latents, world.cond, STEPS, None, generators(2))
    replayed = MapHistory(SupervisedLayers(side))
    replay(bb, inversion, world.cond, world.null, hooks=(replayed,))
    total = 0.0
    for name, maps in replayed.maps.items():
        for i, probs in enumerate(maps):
            target = targets.maps[name][min(STEPS - i, STEPS - 1)]
            total += (probs[probs.shape[0] // 2 :] - target).square().mean().item()
    return total


def test_attention_loss_lowers_the_final_map_distance(world):
    """lambda_att 1e3 (the random UNet's near-uniform maps make the term ~1e-5 of a latent loss ~1: at 1 it moves
    the maps by 0.03%) against 0; a negative weight, pushing the maps away, is the control."""
    distances = {weight: final_map_distance(world, world.invert(attention_weight=weight, early_stop=None))
                 for weight in (0.0, 1e3, -1e3)}
    print("final map distance by lambda_att:", distances)
    assert distances[1e3] < 0.97 * distances[0.0] < 0.97 * distances[-1e3]


def test_the_papers_options(world, monkeypatch):
    """output=value (v = M(E(x)): no scale, 77 channels), N(0, 0.01^2) weights and zero biases, constant lr 1e-4 with
    betas (0, 0.999), no early stop, and one extra UNet call for step 0's target maps."""
    made: list[tuple[float, tuple]] = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, lr, betas) -> None:
            made.append((lr, betas))
            super().__init__(params, lr=lr, betas=betas)

    code = world.invert(inner_steps=1)
    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    paper = world.invert(inner_steps=1, output="value", init_std=0.01, lr=1e-4, lr_decay=False, betas=(0.0, 0.999),
                         early_stop=None, first_step_maps="extra_call")
    assert made == [(1e-4, (0.0, 0.999))] * STEPS
    assert all(torch.equal(scale, torch.zeros_like(scale)) for scale, _ in paper.values)
    assert paper.records[0]["unet_evals"] == code.records[0]["unet_evals"] + 1
    networks = MappingNetworks(generators(1), world.tokens.shape[1], output="value", init_std=0.01)
    assert networks.w_in.shape == (1, 77, world.tokens.shape[1]) and networks.b_in.abs().sum() == 0
    assert networks.w_mid.std().item() == pytest.approx(0.01, rel=0.1)


def test_supervised_layers_and_the_first_layers_maps(backbone):
    """SD's layout at 64 x 64 latents: the five 16 x 16 layers of down_blocks[2] and up_blocks[1], out of 32
    attention layers. The first cross-attention layer's maps cannot depend on the value input (nothing before it
    reads it), later ones do."""
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 8, 8), layers_per_block=2, sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8).eval()
    control, processors = controlled_processors(unet)
    assert len(processors) == 32
    unet.set_attn_processor(dict(processors))
    recorder = MapRecorder(SupervisedLayers(blend_side(unet, 64)))
    with control.using(recorder), torch.no_grad():
        unet(torch.randn(1, 4, 64, 64), 500, encoder_hidden_states=torch.randn(1, 77, 32))
    block = "transformer_blocks.0.attn2"
    assert sorted(recorder.maps) == [f"down_blocks.2.attentions.{k}.{block}" for k in range(2)] + [
        f"up_blocks.1.attentions.{k}.{block}" for k in range(3)]

    control, processors = controlled_processors(backbone.unet)
    backbone.unet.set_attn_processor(dict(processors))
    x, context = torch.randn(1, 4, 16, 16), backbone.encode_text(SOURCES[:1])
    g = torch.Generator().manual_seed(0)
    modulation = ValueModulation(torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g))

    def maps(*hooks) -> dict[str, torch.Tensor]:
        recorder = MapRecorder()
        with control.using(recorder, *hooks), torch.no_grad():
            backbone.unet(x, 500, encoder_hidden_states=context)
        return recorder.maps

    plain, modulated = maps(), maps(modulation)
    first, *later = list(plain)
    assert torch.equal(plain[first], modulated[first])
    assert min((plain[name] - modulated[name]).abs().amax() for name in later) > 1e-4


def test_cache_hits_on_a_rerun_misses_on_a_changed_prompt_and_survives_a_kill(backbone, tmp_path, monkeypatch):
    editor = StyleDiffusion(backbone, RESOLUTION, STEPS, inversion_options={"inner_steps": 1}, cache_dir=tmp_path)
    inverted: list[int] = []  # images per inverter call
    inverter = editor.inverter

    def counting(bb, latents, *args, **kwargs):
        inverted.append(len(latents))
        return inverter(bb, latents, *args, **kwargs)

    editor.inverter = counting
    batch = EditBatch([0, 1], SOURCES, images(), TARGETS)
    first = editor.edit(batch)
    files = list((tmp_path / "stylediffusion").glob("*.pt"))
    assert inverted == [2] and len(files) == 2
    entry_bytes = (4 * 16 * 16 + 2 * STEPS * 77 * 32) * 4  # x_T, then (scale, shift) per step, fp32
    assert all(entry_bytes < path.stat().st_size < entry_bytes + 4096 for path in files)  # one image's, not the batch's
    again = editor.edit(batch)
    assert inverted == [2] and [r["inversion"]["cached"] for r in again.records] == [True, True]
    assert torch.equal(again.edited, first.edited)
    assert again.records[0]["inversion"]["inner_steps"] == first.records[0]["inversion"]["inner_steps"]
    changed = editor.edit(replace(batch, prompts=[SOURCES[0], "a blue square on a chair"],
                                  target_prompts=[TARGETS[0], "a blue circle on a chair"]))
    assert inverted == [2, 1] and [r["inversion"]["cached"] for r in changed.records] == [True, False]

    twice = editor.edit(EditBatch([0, 1], [SOURCES[1]] * 2, images(2, seed=2)[[0, 0]], TARGETS[1:] * 2))
    assert inverted == [2, 1, 1] and [r["inversion"]["cached"] for r in twice.records] == [False, True]
    torch.testing.assert_close(twice.edited[0], twice.edited[1], atol=1e-5, rtol=0)  # one inversion, both edits

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after the inversion, during the edit

    other = replace(batch, images=images(seed=1))
    monkeypatch.setattr(p2p, "denoise", killed)
    with pytest.raises(KeyboardInterrupt):
        editor.edit(other)
    monkeypatch.undo()
    assert inverted == [2, 1, 1, 2]
    resumed = editor.edit(other)
    assert inverted == [2, 1, 1, 2] and [r["inversion"]["cached"] for r in resumed.records] == [True, True]


def test_worker_writes_the_inversions_record_and_a_rerun_reuses_the_cache(tmp_path):
    """Through the generation worker (model=tiny, captioned real images): each pair's json holds its inversion's
    per-step losses, inner steps and seconds; a second run into another out_dir finds every inversion cached."""
    from datagen import launch
    from test_generate import TINY
    from test_generate_scale import NO_LAUNCHER, pairs

    folder = tmp_path / "images"
    folder.mkdir()
    for i, caption in enumerate(["a cat on a sofa", "a black cat"]):
        save_image(images(1, seed=i)[0], folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)

    def run(out_dir: Path) -> list[dict]:
        tiny = [o for o in TINY if not o.startswith("editor.")]
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("generate", [*tiny, "editor=stylediffusion", "editor.num_inference_steps=2",
                                       "editor.inversion_options.inner_steps=2", f"out_dir={out_dir}",
                                       f"cache_dir={tmp_path / 'cache'}", "source=folder", f"source.path={folder}",
                                       "shard_size=2", "batch_size=2"])
        launch.run_workers(cfg, NO_LAUNCHER)
        return [sample["json"] for _, sample in sorted(pairs(out_dir).items())]

    first = run(tmp_path / "first")
    assert [meta["target_prompt"] for meta in first] == ["a dog on a sofa", "a black dog"]
    for meta in first:
        record = meta["inversion"]
        assert record["method"] == "stylediffusion" and record["inner_steps"] == [2, 2] and not record["cached"]
        assert len(record["final_loss"]) == len(record["rec_loss"]) == len(record["att_loss"]) == 2
        assert record["seconds"] > 0 and record["unet_backwards"] == 4
    assert [meta["inversion"]["cached"] for meta in run(tmp_path / "second")] == [True, True]


def test_image_tokens_resize_crop_and_width(backbone):
    """E(x): a larger, non-square image is resized (shorter side to the tower's input, bicubic) and centre-cropped
    as the code's preprocessing; the toy world's CLIP (65 tokens, 64 wide) is pooled to its text's width 32."""
    tokens = image_tokens_for(backbone)  # model=tiny: the random 32 px tower
    wide = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    resized = torch.nn.functional.interpolate(wide, size=(32, 48), mode="bicubic", align_corners=False)[..., 8:40]
    torch.testing.assert_close(tokens(wide), tokens(resized), atol=1e-6, rtol=0)
    assert tokens(wide).shape == (1, 17, 32)
    if (WEIGHTS / "clip").exists():
        toy = image_tokens_for(replace(backbone, name="toy"))
        out = toy(images(2))
        assert out.shape == (2, 65, 32) and toy.name.endswith("clip")
        assert not torch.allclose(out[0], out[1])  # the images' own tokens
