import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from torch._dynamo.testing import CompileCounterWithBackend

from bench.generate import SMOKE_SHARPENING, sharpen_cross_attention
from datagen.editors.base import EditBatch
from datagen.editors.pix2pix_zero import Pix2PixZero
from datagen.inversions.ddim import NoiseRegularizer, ddim_invert
from engine_fixtures import RESOLUTION, make_backbone, random_direction, smooth_backbone

STEPS = 8


@pytest.fixture(scope="module")
def backbone():
    return make_backbone()


def make_editor(backbone, direction, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "num_inversion_steps": STEPS, **kwargs}
    return Pix2PixZero(backbone, direction, resolution=RESOLUTION, **kwargs)


def test_reference_pass_equals_diffusers_pipeline(backbone):
    """Zero direction, no cross-attention guidance: both our passes are SD's own sampling loop."""
    editor = make_editor(backbone, torch.zeros(1, 77, 32), xa_guidance_synthetic=0.0)
    prompts, seeds = ["a photo of a cat", "a cat on a sofa"], [11, 12]
    ours = editor.edit(EditBatch(seeds, prompts))
    pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                   unet=backbone.unet, scheduler=backbone.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, latents=editor.initial_noise(seeds), num_inference_steps=STEPS, guidance_scale=5.0,
                  output_type="pt").images
    torch.testing.assert_close(ours.inputs, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.edited, ours.inputs, atol=1e-5, rtol=0)


class UNetCalls:
    """Every UNet forward inside the block: (sample, timestep), the sample a detached copy."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet, self.calls = unet, []

    def __enter__(self) -> "UNetCalls":
        self.handle = self.unet.register_forward_pre_hook(self.record, with_kwargs=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append((args[0].detach().clone(), args[1]))


def explicit_maps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
    """softmax(Q K^T / sqrt(d)) of every cross-attention layer (rows, heads, pixels, tokens), written out from its
    query and key projections (read by hooks) under diffusers' own attention: nothing of the editor's."""
    layers = [module for name, module in unet.named_modules() if name.endswith("attn2")]
    projected = {}
    handles = [projection.register_forward_hook(lambda module, args, out: projected.__setitem__(module, out))
               for layer in layers for projection in (layer.to_q, layer.to_k)]
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        unet(x, t, encoder_hidden_states=context)
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for layer in layers:
        q, k = projected[layer.to_q], projected[layer.to_k]  # rows x pixels x (heads * d), rows x 77 x (heads * d)
        q, k = (y.view(y.shape[0], y.shape[1], layer.heads, -1).transpose(1, 2) for y in (q, k))
        maps.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
    return maps


def attention_loss(edit_maps: list[torch.Tensor], reference_maps: list[torch.Tensor]) -> torch.Tensor:
    """pix2pix-zero's L_xa of one sample (METHOD.md section 3): per layer, the squared distance summed over pixels
    and tokens, averaged over the rows (both guidance halves x heads); summed over the layers."""
    return sum((edit - ref).pow(2).sum(dim=(2, 3)).mean() for edit, ref in zip(edit_maps, reference_maps))


@pytest.fixture(scope="module")
def sharp_backbone():
    """The tiny backbone with its cross-attention sharpened as the generation benchmark's smoke does: random weights
    alone give near-uniform maps, whose guidance gradient is too small to tell a right step from a wrong one."""
    backbone = make_backbone()
    sharpen_cross_attention(backbone.unet, SMOKE_SHARPENING)
    return backbone


STEP_ATOL = 1e-6  # a guided latent against x - xa grad L_xa: fp32 rounding of two ways to compute the maps


@pytest.mark.parametrize("xa_update", ["official", "shared"])
def test_each_guidance_step_moves_x_by_xa_times_the_gradient_of_the_attention_loss(sharp_backbone, xa_update):
    """At each of 2 edit steps on synthetic inputs, the guided forward's latents must be x - xa grad L_xa per guidance
    half (official; the paper's shared rule: both halves x - xa (grad_uncond + grad_cond)), x the step's edit latents,
    with L_xa written here from its definition, per sample alone, on maps computed here. (At step 1 the edit and
    reference latents are equal, so the unconditional half, whose text is the reference's, has no gradient yet;
    at step 2 both halves have one.) Each step moves x and the other rule lands as far off (measured: >= 0.019,
    10^4 times the tolerance; the unconditional half at step 2: 0.005; the editor is off by 3e-7), so a wrong loss
    reduction or scale, or swapped halves or samples fail."""
    bb, xa, prompts = sharp_backbone, 0.15, ["a photo of a cat", "a cat in the grass"]
    direction = random_direction(bb)
    editor = make_editor(bb, direction, num_inference_steps=2, xa_update=xa_update)
    with UNetCalls(bb.unet) as unet:
        result = editor.edit(EditBatch([1, 2], prompts))
    assert len(unet.calls) == 2 * 3  # per step: reference, guidance (with its backward), guided forward
    uncond, used_loss = bb.encode_text([""]), torch.zeros(2)
    for step in range(2):
        (reference_x, t), (guidance_x, _), (guided_x, _) = unet.calls[3 * step : 3 * step + 3]
        for i, prompt in enumerate(prompts):
            cond = bb.encode_text([prompt])
            x_ref, x = reference_x[[i]], guidance_x[[i]]
            torch.testing.assert_close(guidance_x[[i + 2]], x, atol=0, rtol=0)  # both halves start from x
            reference_maps = explicit_maps(bb.unet, torch.cat([x_ref, x_ref]), t, torch.cat([uncond, cond]))
            x_in = torch.cat([x, x]).requires_grad_(True)
            loss = attention_loss(explicit_maps(bb.unet, x_in, t, torch.cat([uncond, cond + direction])), reference_maps)
            (grad,) = torch.autograd.grad(loss, x_in)
            steps = {"official": -xa * grad, "shared": -xa * grad.sum(0, keepdim=True).expand(2, -1, -1, -1)}
            moved = guided_x[[i, i + 2]]  # sample i's unconditional and conditional halves
            torch.testing.assert_close(moved, torch.cat([x, x]) + steps[xa_update], atol=STEP_ATOL, rtol=0)
            (other,) = set(steps) - {xa_update}
            assert min(steps[xa_update].abs().max(), (steps[xa_update] - steps[other]).abs().max()) > 1e4 * STEP_ATOL
            used_maps = explicit_maps(bb.unet, moved, t, torch.cat([uncond, cond + direction]))
            used_loss[i] += attention_loss(used_maps, reference_maps) / 2  # the mean over the 2 steps
        if step == 1:  # the unconditional half's own gradient counts
            assert (guided_x[:2] - guidance_x[:2]).abs().max() > 1e3 * STEP_ATOL
    # the reported L_xa: the mean over the steps of that of the maps each guided forward used
    torch.testing.assert_close(result.xa_loss, used_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("xa_update", ["official", "shared"])
def test_batch_equals_single_runs_and_is_reproducible(xa_update):
    """On smooth stand-ins for the UNet (one cross-attention layer) and the VAE, where float order cannot be amplified
    as random networks do, batch and single runs agree to 1e-5 (measured: exactly), real inputs (inversion with
    the noise regularizer's per-sample offsets) included. The guidance moves each edit by 0.37 to 1, so samples
    that took each other's maps, offsets or gradients would fail. The UNet's work per pair is counted by a hook."""
    bb = smooth_backbone()
    editor, unguided = (make_editor(bb, random_direction(bb), xa_update=xa_update, num_inference_steps=4,
                                    num_inversion_steps=4, regularizer=NoiseRegularizer(), **guidance)
                        for guidance in ({}, {"xa_guidance_real": 0.0, "xa_guidance_synthetic": 0.0}))
    seeds, prompts = [3, 4, 5], ["a cat", "a small cat", "a cat on a bed"]
    images = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    # per pair: 4 edit steps x (reference, guidance, guided) x 2 guidance halves; a real input adds its 4 inversion
    # steps and has one reference forward per step (its caption is also its negative prompt)
    for real, unet_evals in ((None, 4 * 3 * 2), (images, 4 + 4 * (1 + 2 * 2))):
        with UNetCalls(bb.unet) as unet:
            together = editor.edit(EditBatch(seeds, prompts, real))
        assert sum(x.shape[0] for x, _ in unet.calls) == 3 * unet_evals == 3 * together.unet_evals
        for i in range(3):
            alone = editor.edit(EditBatch(seeds[i : i + 1], prompts[i : i + 1], None if real is None else real[i : i + 1]))
            torch.testing.assert_close(alone.edited[0], together.edited[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.inputs[0], together.inputs[i], atol=1e-5, rtol=0)
        guidance = (unguided.edit(EditBatch(seeds, prompts, real)).edited - together.edited).abs().flatten(1).amax(1)
        assert torch.all(guidance > 1e4 * 1e-5), guidance
        again = editor.edit(EditBatch(seeds, prompts, real))
        assert torch.equal(again.edited, together.edited)  # same seed, same config: same bytes


def test_compiled_editor_makes_the_same_pair(backbone):
    """torch.compile captures the cross-attention processors' side effects (maps recorded in one forward, the
    loss summed in another, a backward through it): the compiled editor's pair and L_xa are the eager one's.
    aot_eager traces as inductor does (dynamo + AOT autograd) but runs eager kernels, so equality is exact;
    inductor's own fused kernels take minutes to build on a CPU (BENCHMARKS.md has its figures)."""
    direction = random_direction(backbone)
    batch = EditBatch([3, 4], ["a cat", "a cat on a bed"], torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)))
    eager = make_editor(backbone, direction, num_inference_steps=2, num_inversion_steps=2).edit(batch)
    torch._dynamo.reset()
    graphs = CompileCounterWithBackend("aot_eager")
    compiled_editor = make_editor(backbone, direction, num_inference_steps=2, num_inversion_steps=2, compile={"backend": graphs})
    compiled = compiled_editor.edit(batch)
    # one graph per way the editor calls the UNet: inversion, recording, guidance (with grad), guided forward
    assert graphs.frame_count == 4, graphs.frame_count
    assert compiled_editor.backbone.unet is not backbone.unet and not isinstance(backbone.unet, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(compiled.edited, eager.edited, atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled.xa_loss, eager.xa_loss, atol=1e-6, rtol=0)
    assert compiled.unet_evals == eager.unet_evals


def test_no_step_reads_a_device_value_on_the_host():
    """A read of a device value on the host (`.item()`, `if tensor`, indexing a host table by a device
    timestep, as diffusers' schedulers do with device timesteps) makes the host wait for the GPU's queued
    UNet work at every step. The meta device holds no values, so any such read raises there: inversion
    (with the noise regularizer) and both editing loops, real and synthetic, must run on it to the end."""
    meta = make_backbone().to(torch.device("meta"), torch.float32)
    editor = make_editor(meta, torch.zeros(1, 77, 32, device="meta"), num_inference_steps=2, num_inversion_steps=2,
                         regularizer=NoiseRegularizer())
    meta.unet.set_attn_processor(dict(editor.processors))
    latents, cond = torch.zeros(2, 4, 32, 32, device="meta"), torch.zeros(2, 77, 32, device="meta")
    x_T = ddim_invert(meta, latents, cond, 2, editor.regularizer, [torch.Generator().manual_seed(s) for s in (0, 1)])
    for uncond in (None, torch.zeros_like(cond)):  # a real input's loop (caption as negative prompt), a synthetic one's
        reference, edited, xa_loss, _ = editor.lockstep(x_T, uncond, cond, cond, xa_guidance=0.1)
        assert reference.shape == edited.shape == (2, 4, 32, 32) and xa_loss.shape == (2,)
