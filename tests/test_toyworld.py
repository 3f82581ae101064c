"""The toy world: renderer, captions and splits on constructed scenes; the committed models' quality."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from transformers import (BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPSegForImageSegmentation,
                          CLIPTextModel, CLIPTokenizer)

from datagen.tokenizer import clip_tokenizer
from toyworld import evaluate
from toyworld.data import TokenCache, segmentation_prompts
from toyworld.render import render
from toyworld.sentences import BANKS, SENTENCES
from toyworld.models import WEIGHTS
from toyworld.train import (PHASES, STAGES, Stage, TrainConfig, config, optimise, preset, record_stage, train_side_by_side,
                            train_world, training_noise)
from toyworld.world import COLOURS, SHAPES, caption, captions, is_held_out, sample_scenes

CPU = torch.device("cpu")
TASKS = Path(__file__).resolve().parent.parent / "conf" / "task"


def one_object(shape: str = "circle", colour: str = "red", striped: bool = False, dot: bool = False,
               outline: bool = False, background: int = 0, dark: bool = True, radius: float = 8.0, size: int = 32):
    """A single object centred in the image, every attribute chosen."""
    scenes = sample_scenes(1, 0, size=size, two_object_prob=0.0, held_out="any")
    scenes.shape[:] = SHAPES.index(shape)
    scenes.colour[:] = COLOURS.index(colour)
    scenes.striped[:], scenes.dot[:], scenes.outline[:] = striped, dot, outline
    scenes.background[:], scenes.dark[:] = background, dark
    scenes.centre[:] = size / 2
    scenes.radius[:] = radius
    return scenes


# ---------------------------------------------------------------- renderer and captions
def test_same_seed_same_images_other_seed_other_images():
    a, a_masks = render(sample_scenes(8, 3))
    b, b_masks = render(sample_scenes(8, 3))
    c, _ = render(sample_scenes(8, 4))
    assert torch.equal(a, b) and torch.equal(a_masks, b_masks)
    assert (a - c).abs().mean() > 0.05
    assert a.shape == (8, 3, 32, 32) and 0 <= a.min() and a.max() <= 1


@pytest.mark.parametrize("shape, area", [("circle", math.pi * 64), ("square", 2 * (1.2 * 8) ** 2)])
def test_mask_area_is_the_shapes_area(shape: str, area: float):
    _, masks = render(one_object(shape, radius=8.0, size=64))
    assert masks[0, 0].sum().item() == pytest.approx(area, rel=0.02)
    assert masks[0, 1].sum() == 0  # no second object


def test_outline_keeps_the_mask_but_shows_the_background_inside():
    filled, masks = render(one_object(outline=False))
    outline, outline_masks = render(one_object(outline=True))
    assert torch.equal(masks, outline_masks)
    centre = (slice(None), 16, 16)
    assert torch.allclose(outline[0][centre], outline[0][:, 1, 1], atol=0.02)    # background inside the stroke
    assert not torch.allclose(filled[0][centre], filled[0][:, 1, 1], atol=0.2)


def test_stripes_and_dot_change_only_pixels_inside_the_object():
    plain, masks = render(one_object())
    for changed in (one_object(striped=True), one_object(dot=True)):
        image, _ = render(changed)
        differs = (image - plain).abs().amax(1)[0] > 1e-4
        assert differs.any() and (masks[0, 0][differs] > 0).all()


def test_caption_grammar():
    scenes = one_object("circle", "red", striped=True, dot=True, outline=True, background=1, dark=True)
    assert caption(scenes, 0) == "an outline drawing of a red striped circle with a dot on a dark gradient background"
    scenes = one_object("star", "orange", background=0, dark=False)
    assert caption(scenes, 0) == "an orange star on a light background"
    two = sample_scenes(200, 0, two_object_prob=1.0, held_out="any")
    assert all(" and " in text for text in captions(two))


def test_partial_captions_keep_stripes_dot_and_style():
    scenes = one_object("square", "blue", striped=True, dot=True, outline=True)
    rng = np.random.default_rng(0)
    texts = {caption(scenes, 0, rng, partial_prob=1.0) for _ in range(200)}
    assert len(texts) > 5
    assert all(t.startswith("an outline drawing of a") and "striped" in t and "with a dot" in t for t in texts)


def test_held_out_descriptions_never_reach_training():
    train = sample_scenes(4000, 0)
    held = sample_scenes(200, 1, held_out="only")
    assert not is_held_out(train).any() and is_held_out(held).all()
    train_texts, held_texts = set(captions(train)), set(captions(held))
    assert not train_texts & held_texts
    share = is_held_out(sample_scenes(4000, 2, two_object_prob=0.0, held_out="any")).mean()
    assert 0.05 < share < 0.15


def test_segmentation_prompt_targets_are_the_objects_the_words_fit():
    scenes = sample_scenes(300, 5, two_object_prob=1.0, held_out="any")
    _, masks = render(scenes)
    phrases, targets = segmentation_prompts(scenes, np.random.default_rng(0), masks)
    for i, phrase in enumerate(phrases):
        words = phrase.split()
        fits = [k for k in range(2) if ("shape" in words or SHAPES[scenes.shape[i, k]] in words)
                and all(c not in words or COLOURS[scenes.colour[i, k]] == c for c in COLOURS)
                and ("striped" not in words or scenes.striped[i, k]) and ("dot" not in words or scenes.dot[i, k])]
        expected = masks[i, fits].amax(0) if fits else torch.zeros(32, 32)
        assert torch.equal(targets[i], expected), phrase


# ---------------------------------------------------------------- sentence banks and task configs
@pytest.mark.parametrize("name", ["circle2square", "plain2striped", "circle2circle_dot", "outline2filled"])
def test_toy_task_banks_exist_and_hold_200_distinct_sentences(name: str):
    task = OmegaConf.load(TASKS / f"{name}.yaml")
    for bank in (task.source_bank, task.target_bank):
        lines = (SENTENCES / f"{bank}.txt").read_text().splitlines()
        assert len(set(lines)) == len(lines) >= 200
        attributes, word = BANKS[bank]
        assert word is None or all(word in line.split() for line in lines)
    source, target = ((SENTENCES / f"{b}.txt").read_text() for b in (task.source_bank, task.target_bank))
    if name == "circle2square":
        assert "square" not in source and "circle" not in target
    if name == "outline2filled":
        assert all(s.startswith("an outline") for s in source.splitlines()) and "outline" not in target


# ---------------------------------------------------------------- the committed, trained world
needs_weights = pytest.mark.skipif(not (WEIGHTS / "unet").exists(), reason="toyworld/weights not trained yet")


@pytest.fixture(scope="module")
def world():
    load = dict(torch_dtype=torch.float32)
    return dict(
        clip=CLIPModel.from_pretrained(WEIGHTS / "clip", **load).eval(),
        tokens=TokenCache(CLIPTokenizer.from_pretrained(WEIGHTS, subfolder="tokenizer")),
        vae=AutoencoderKL.from_pretrained(WEIGHTS, subfolder="vae", **load).eval(),
    )


@needs_weights
def test_weights_fit_the_budget_and_tokenizer_matches_sd():
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 25e6, total
    tokenizer = CLIPTokenizer.from_pretrained(WEIGHTS, subfolder="tokenizer")
    ids = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and tokenizer.model_max_length == 77


@needs_weights
def test_clip_zero_shot_shape_and_colour(world):
    figures = evaluate.clip_zero_shot(world["clip"], world["tokens"], 128, seed=1000, device=CPU)
    assert figures["clip_shape_acc"] >= 0.85 and figures["clip_colour_acc"] >= 0.9, figures


@needs_weights
def test_clip_text_tower_is_the_unet_text_encoder(world):
    """The UNet was trained on the CLIP's text tower; later CLIP training must leave it untouched."""
    text_encoder = CLIPTextModel.from_pretrained(WEIGHTS, subfolder="text_encoder", torch_dtype=torch.float32)
    tower = world["clip"].text_model.state_dict()
    assert all(torch.equal(value, tower[name]) for name, value in text_encoder.state_dict().items())


@needs_weights
def test_vae_reconstructs(world):
    assert evaluate.vae_psnr(world["vae"], 64, seed=1001, device=CPU)["vae_psnr_db"] >= 30


@needs_weights
def test_diffusion_draws_held_out_captions(world):
    """Held-out captions through diffusers' own pipeline, loaded from the folder as the engine loads SD."""
    load = dict(torch_dtype=torch.float32)
    pipeline = StableDiffusionPipeline(
        vae=world["vae"], text_encoder=CLIPTextModel.from_pretrained(WEIGHTS, subfolder="text_encoder", **load),
        tokenizer=world["tokens"].tokenizer, unet=UNet2DConditionModel.from_pretrained(WEIGHTS, subfolder="unet", **load),
        scheduler=DDIMScheduler.from_pretrained(WEIGHTS, subfolder="scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae_scale_factor == 2
    figures, _, _ = evaluate.diffusion_accuracy(pipeline, world["clip"], world["tokens"], 16, seed=1002, steps=20)
    # here 0.875; chance 1/24; 0.44 before the offset-noise fine-tune, when the UNet read the scene's mean from x_T
    assert figures["diffusion_match"] >= 0.6, figures
    # From unrelated scenes noised to 0.8 of the schedule it follows the captions too, not the scenes' layout.
    from_scenes, _, _ = evaluate.diffusion_accuracy(pipeline, world["clip"], world["tokens"], 16, seed=1002, steps=20,
                                                    strength=evaluate.IMG2IMG_STRENGTH)
    assert from_scenes["diffusion_match_img2img_0.8"] >= 0.5, from_scenes   # here 0.81


@needs_weights
def test_segmenter_finds_the_named_shape(world):
    segmenter = CLIPSegForImageSegmentation.from_pretrained(WEIGHTS / "segmenter", torch_dtype=torch.float32).eval()
    assert evaluate.segmenter_iou(segmenter, world["tokens"], 64, seed=1003, device=CPU)["segmenter_iou"] >= 0.65


@needs_weights
def test_captioner_writes_the_caption():
    captioner = BlipForConditionalGeneration.from_pretrained(WEIGHTS / "captioner", torch_dtype=torch.float32).eval()
    processor = BlipProcessor.from_pretrained(WEIGHTS / "captioner")
    figures = evaluate.captioner_exact_match(captioner, processor, 32, seed=1004, device=CPU)
    assert figures["captioner_exact_match"] >= 0.2, figures


def test_token_cache_equals_the_tokenizer():
    tokenizer = clip_tokenizer()
    texts = captions(sample_scenes(64, 9), np.random.default_rng(0), partial_prob=0.5) + [""]
    expected = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(TokenCache(tokenizer)(texts, CPU), expected)


def test_training_one_stage_again_keeps_the_others(tmp_path):
    """A few steps of every stage, then the segmenter alone: the other models' files and summary entries
    stay as they were, and the CLIP's text tower stays the saved text encoder."""
    tiny = Stage(2, 8, 1e-3)
    cfg = TrainConfig(out=tmp_path, device="cpu", clip=tiny, clip_vision=tiny, vae=tiny, vae_decoder=tiny, unet=tiny, segmenter=tiny,
                      captioner=tiny, eval_size=8, eval_diffusion_size=2)
    first = train_world(cfg)
    assert list(first["stages"]) == list(STAGES)
    unet_bytes = (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    segmenter_bytes = (tmp_path / "segmenter" / "model.safetensors").read_bytes()
    text_encoder = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").state_dict()
    clip_text = CLIPModel.from_pretrained(tmp_path / "clip").text_model.state_dict()
    assert all(torch.equal(value, clip_text[name]) for name, value in text_encoder.items())

    cfg.seed = 1
    again = train_world(cfg, ("segmenter",))
    assert again["stages"]["segmenter"]["seed"] == 1
    assert {name: again["stages"][name] for name in STAGES if name != "segmenter"} == \
           {name: first["stages"][name] for name in STAGES if name != "segmenter"}
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_bytes
    assert (tmp_path / "segmenter" / "model.safetensors").read_bytes() != segmenter_bytes

    # The decoder goes on learning; the encoder, whose latent space the UNet learnt, does not move.
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    train_world(cfg, ("vae_decoder",))
    tuned = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    assert all(torch.equal(tuned[name], value) for name, value in vae.items() if name.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(tuned[name], value) for name, value in vae.items() if name.startswith("decoder."))
    assert tuned.keys() == vae.keys()

    # `--continue-unet` starts from the saved UNet: at learning rate 0 it comes back unchanged (a fresh one would
    # not), and its entry keeps the run it continues.
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    cfg.unet, cfg.continue_unet = Stage(2, 8, 0.0), True
    continued = train_world(cfg, ("unet",))["stages"]["unet"]
    assert continued["continues"] == first["stages"]["unet"]
    assert all(torch.equal(value, unet[name]) for name, value in
               UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict().items())


def test_offset_noise_adds_a_constant_per_image_and_channel():
    """The spatial mean of plain noise over 16 x 16 has variance 1 / 256; the offset adds offset^2 to it and
    nothing to the noise around that mean."""
    torch.manual_seed(0)
    latents = torch.zeros(4096, 4, 16, 16)
    for offset in (0.0, 0.3):
        noise = training_noise(latents, offset)
        means = noise.mean((2, 3), keepdim=True)
        assert means.var().item() == pytest.approx(1 / 256 + offset ** 2, rel=0.05)
        assert (noise - means).var().item() == pytest.approx(1 - 1 / 256, rel=0.01)


def test_a_stage_of_the_preset_can_be_overridden_from_the_command_line():
    args = Namespace(out=Path("w"), device="cpu", seed=0, preset="cpu", steps_scale=1.0, continue_unet=True,
                     noise_offset=0.25, stage=[["unet", "2700", "64", "1e-3"], ["clip", "10", "8", "0.5"]])
    cfg, cpu = config(args), preset("cpu")
    assert (cfg.unet, cfg.clip) == (Stage(2700, 64, 1e-3), Stage(10, 8, 0.5)) and cpu.unet != cfg.unet
    assert (cfg.noise_offset, cfg.continue_unet) == (0.25, True) != (cpu.noise_offset, cpu.continue_unet)
    assert config(Namespace(**{**vars(args), "noise_offset": None})).noise_offset == cpu.noise_offset
    assert (cfg.vae, cfg.eval_size) == (cpu.vae, cpu.eval_size)
    with pytest.raises(SystemExit, match="unets: not a stage"):
        config(Namespace(**{**vars(args), "stage": [["unets", "1", "1", "1"]]}))


def test_side_by_side_phases_train_every_stage_once_after_its_inputs():
    phase_of = {stage: i for i, phase in enumerate(PHASES) for group in phase for stage in group}
    assert sorted(stage for phase in PHASES for group in phase for stage in group) == sorted(STAGES)
    assert phase_of["unet"] > max(phase_of["vae"], phase_of["clip"]) and phase_of["clip_vision"] > phase_of["clip"]


def test_clip_vision_run_again_keeps_the_earlier_run_in_its_entry(tmp_path):
    record_stage(tmp_path, "clip", {"finished": 1})
    record_stage(tmp_path, "clip_vision", {"finished": 2, "steps": 10})
    summary = record_stage(tmp_path, "clip_vision", {"finished": 3, "steps": 20})
    assert summary["stages"]["clip_vision"]["continues"]["steps"] == 10
    record_stage(tmp_path, "clip", {"finished": 4})       # a new CLIP: clip_vision starts over
    summary = record_stage(tmp_path, "clip_vision", {"finished": 5, "steps": 30})
    assert "continues" not in summary["stages"]["clip_vision"] and summary["stages"]["clip"]["finished"] == 4


def test_sigterm_ends_a_stage_after_its_step_and_records_the_steps_taken():
    """A device call's `timeout` or a cluster's pre-emption: the stage keeps what it trained (it is then evaluated
    and saved), and summary.json says how many steps it took."""
    weight = torch.nn.Parameter(torch.ones(2))
    steps_seen, before = [], signal.getsignal(signal.SIGTERM)

    def loss_fn(step: int) -> torch.Tensor:
        steps_seen.append(step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return weight.pow(2).sum()

    spent = optimise("test", [weight], Stage(100, 1, 0.1), 1.0, iter(range(1, 101)), loss_fn)
    assert spent.steps == 3 and steps_seen == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is before  # the stage's handler is gone once it ends


STAGE_STANDIN = """
import os, signal, sys
def stop(*_):
    open(sys.argv[1], "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.alarm(120)   # if SIGTERM is never passed on, the stage fails the test instead of hanging it
os.write(int(sys.argv[2]), b"ready\\n")
while True:
    signal.pause()
"""


def test_side_by_side_passes_sigterm_on_and_starts_no_later_phase(tmp_path, monkeypatch):
    """`timeout` or pre-emption of `--side-by-side`: the running stages get the signal (and save), no new one starts."""
    popen, started = subprocess.Popen, []
    ready, ready_write = os.pipe()

    def stage_process(command, env):
        started.append(command)
        return popen([sys.executable, "-c", STAGE_STANDIN, str(tmp_path / f"stopped-{len(started)}"), str(ready_write)],
                     env=env, pass_fds=(ready_write,))

    def terminate_when_running() -> None:
        with os.fdopen(ready, "rb", buffering=0) as pipe:
            for _ in PHASES[0]:
                pipe.readline()
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(subprocess, "Popen", stage_process)
    threading.Thread(target=terminate_when_running, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    args = Namespace(out=tmp_path, device="cpu", seed=0, preset="cpu", steps_scale=1.0, stage=[["unet", "9", "8", "0.1"]],
                     continue_unet=True, noise_offset=0.2)
    summary = train_side_by_side(args, STAGES)
    os.close(ready_write)
    assert [command[command.index("--stages") + 1:] for command in started] == [list(group) for group in PHASES[0]]
    assert all(command[command.index("--stage") + 1:][:4] == ["unet", "9", "8", "0.1"] for command in started)
    assert all("--continue-unet" in command and command[command.index("--noise-offset") + 1] == "0.2" for command in started)
    assert sorted(p.name for p in tmp_path.glob("stopped-*")) == ["stopped-1", "stopped-2"]
    assert summary == {"stages": {}} and signal.getsignal(signal.SIGTERM) is before
