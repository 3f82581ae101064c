"""SDEdit against diffusers' StableDiffusionImg2ImgPipeline on the same tiny components."""
import inspect
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datagen.editors.base import EditBatch, initial_noise
from datagen.editors.sdedit import SDEdit
from engine_fixtures import RESOLUTION, make_backbone

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "editor" / "sdedit.yaml"
TARGETS = ["a photo of a dog", "a dog on a sofa"]
# Near fp32 rounding: the pipeline encodes a generator list's images one at a time and we encode the batch, so
# the convolutions' float order differs (measured 7e-6 on latents of magnitude ~8, 1.3e-6 on the images; batch
# vs single runs 3e-6). Synthetic inputs never meet the encoder, and match the pipelines to the bit today.
LATENT_ATOL, IMAGE_ATOL = 5e-5, 1e-5


@pytest.fixture(scope="module")
def backbone():
    return make_backbone()


def pipeline(cls, backbone):
    """diffusers' pipeline on the backbone's components, with a scheduler of its own (it sets its timesteps)."""
    pipe = cls(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
               scheduler=DDIMScheduler.from_config(backbone.scheduler.config), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds, skip=0):
    """One generator per seed, `skip` latents already drawn from each."""
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    for g in gens:
        for _ in range(skip):
            torch.randn(4, RESOLUTION // 2, RESOLUTION // 2, generator=g)  # one latent of the tiny VAE (2x down)
    return gens


def images(count, seed=0):
    return torch.rand(count, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))


def img2img(backbone, image, prompts, seeds, strength, steps, skip=0):
    """The pipeline's images and final latents (read by its step callback)."""
    final = {}

    def keep_latents(pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    out = pipeline(StableDiffusionImg2ImgPipeline, backbone)(
        prompts, image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
        generator=generators(seeds, skip), output_type="pt", callback_on_step_end=keep_latents)
    return out.images, final["latents"]


def test_real_inputs_equal_diffusers_img2img(backbone):
    seeds, image = [3, 4], images(2)
    editor = SDEdit(backbone, RESOLUTION, strength=0.5, num_inference_steps=10)
    ours = editor.edit(EditBatch(seeds, ["a photo of a cat", "a cat on a sofa"], image, TARGETS))
    gens = generators(seeds)
    latents = editor.edit_latents(editor.encode(image, gens), gens, backbone.encode_text(TARGETS))
    theirs, their_latents = img2img(backbone, image, TARGETS, seeds, strength=0.5, steps=10)
    torch.testing.assert_close(latents, their_latents, atol=LATENT_ATOL, rtol=0)
    torch.testing.assert_close(ours.edited, theirs, atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(ours.inputs, image)
    # Control: the same inputs with each other's seed are another edit, far beyond the tolerance.
    swapped = editor.edit(EditBatch(seeds[::-1], ["a photo of a cat", "a cat on a sofa"], image, TARGETS))
    assert (swapped.edited - theirs).abs().max() > 1000 * IMAGE_ATOL


def test_synthetic_inputs_equal_diffusers(backbone):
    """The input is SD's own sample of the source prompt from initial_noise(seeds); SDEdit starts from its
    latents, with the noise each generator draws after x_T."""
    seeds, sources = [7, 8], ["a photo of a cat", "a cat in the snow"]
    editor = SDEdit(backbone, RESOLUTION, strength=0.5, num_inference_steps=4)
    ours = editor.edit(EditBatch(seeds, sources, target_prompts=TARGETS))
    source = pipeline(StableDiffusionPipeline, backbone)(
        sources, latents=initial_noise(backbone, seeds, RESOLUTION), num_inference_steps=4, guidance_scale=7.5,
        output_type="latent").images
    theirs, _ = img2img(backbone, source, TARGETS, seeds, strength=0.5, steps=4, skip=1)  # latents: no VAE
    torch.testing.assert_close(ours.inputs, backbone.decode_latents(source), atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(ours.edited, theirs, atol=IMAGE_ATOL, rtol=0)
    assert ours.unet_evals == 2 * 4 + 2 * 2  # source sample: N guided steps; SDEdit: int(N s)
    assert ours.finite.all()


@pytest.mark.parametrize("steps, strength", [(50, 0.8), (10, 0.55), (7, 0.3), (100, 0.29), (50, 1.0), (10, 0.1)])
def test_step_count_and_t0(backbone, steps, strength):
    """k = int(N s) (100 x 0.29 = 28.999...: 28), t0 = timesteps[N - k], as the pipeline's get_timesteps."""
    editor = SDEdit(backbone, RESOLUTION, strength=strength, num_inference_steps=steps)
    pipe = pipeline(StableDiffusionImg2ImgPipeline, backbone)
    pipe.scheduler.set_timesteps(steps)
    timesteps, count = pipe.get_timesteps(steps, strength, "cpu")
    assert editor.steps == count == int(steps * strength)
    assert editor.t0 == int(timesteps[0]) == int(pipe.scheduler.timesteps[steps - int(steps * strength)])


def test_noisy_latent_is_the_forward_process(backbone):
    """z_t0 = sqrt(abar) z0 + sqrt(1 - abar) eps, eps each generator's draw after z0's, = the scheduler's add_noise."""
    seeds = [1, 2]
    editor = SDEdit(backbone, RESOLUTION, strength=0.6, num_inference_steps=20)
    z0 = torch.randn(2, 4, RESOLUTION // 2, RESOLUTION // 2, generator=torch.Generator().manual_seed(9))
    noisy = editor.add_noise(z0, generators(seeds, skip=1))
    eps = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generators(seeds, skip=1)])
    alpha_bar = backbone.scheduler.alphas_cumprod[editor.t0]
    torch.testing.assert_close(noisy, alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * eps, atol=0, rtol=0)
    scheduler = DDIMScheduler.from_config(backbone.scheduler.config)
    torch.testing.assert_close(noisy, scheduler.add_noise(z0, eps, torch.tensor([editor.t0] * 2)), atol=0, rtol=0)


@pytest.mark.parametrize("guidance_scale, rows_per_step", [(7.5, 2), (1.0, 1)])
def test_full_strength_runs_all_steps(backbone, guidance_scale, rows_per_step):
    """s = 1 starts at the first timestep and runs all N; unet_evals counts the UNet's rows per pair."""
    editor = SDEdit(backbone, RESOLUTION, strength=1.0, num_inference_steps=3, guidance_scale=guidance_scale)
    calls = []
    hook = backbone.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        (int(args[1]), args[0].shape[0])), with_kwargs=True)
    try:
        result = editor.edit(EditBatch([5], ["a cat"], images(1), ["a dog"]))
    finally:
        hook.remove()
    backbone.scheduler.set_timesteps(3)
    assert calls == [(int(t), rows_per_step) for t in backbone.scheduler.timesteps]
    assert editor.t0 == int(backbone.scheduler.timesteps[0])
    assert result.unet_evals == rows_per_step * 3
    assert result.records == [{"sdedit": {"strength": 1.0, "steps": 3, "t0": editor.t0}}]


@pytest.mark.parametrize("real", [True, False], ids=["real", "synthetic"])
def test_batch_equals_single_runs(backbone, real):
    seeds, sources = [3, 4], ["a cat", "a cat on a bed"]
    image = images(2) if real else None
    editor = SDEdit(backbone, RESOLUTION, strength=0.5, num_inference_steps=4)
    batch = editor.edit(EditBatch(seeds, sources, image, TARGETS))
    for i in range(2):
        one = slice(i, i + 1)
        single = editor.edit(EditBatch(seeds[one], sources[one], None if image is None else image[one], TARGETS[one]))
        torch.testing.assert_close(batch.inputs[one], single.inputs, atol=IMAGE_ATOL, rtol=0)
        torch.testing.assert_close(batch.edited[one], single.edited, atol=IMAGE_ATOL, rtol=0)
        assert single.unet_evals == batch.unet_evals and single.records == batch.records[one]


def test_config_holds_the_pipeline_defaults(backbone):
    """conf/editor/sdedit.yaml builds the editor as the worker does, with StableDiffusionImg2ImgPipeline's defaults."""
    cfg = OmegaConf.load(CONFIG)
    editor = instantiate(cfg, _partial_=True)(backbone=backbone, resolution=RESOLUTION, compile=False)
    defaults = inspect.signature(StableDiffusionImg2ImgPipeline.__call__).parameters
    for name in ("strength", "num_inference_steps", "guidance_scale"):
        assert getattr(editor, name) == cfg[name] == defaults[name].default
    assert isinstance(editor, SDEdit) and SDEdit.uses_target_prompts and editor.steps == 40


def test_rejects_what_it_cannot_run(backbone):
    with pytest.raises(ValueError, match="strength"):
        SDEdit(backbone, RESOLUTION, strength=0.01, num_inference_steps=50)  # int(0.5) = 0 steps
    with pytest.raises(ValueError, match="target_prompts"):
        SDEdit(backbone, RESOLUTION).edit(EditBatch([0], ["a cat"]))
