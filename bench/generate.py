"""Generation benchmark: our batched lockstep pix2pix-zero editor against the official loop, same weights.

    python -m bench.generate                    # SD-1.4-size random UNet on a GPU, a small one on the CPU
    python -m bench.generate --smoke            # tiny components (cross-attention sharpened), 2 steps: seconds on a CPU
    python -m bench.generate --compile          # also ours with its UNet under torch.compile (largest batch)
    python -m bench.generate --editor p2p sdedit p2p:null_text   # other teachers (conf/editor/), beside pix2pix-zero
    python -m bench.generate --editor all       # every teacher with every inversion it takes

First both editors make the same pair from the same input (max abs difference printed): equal outputs are what make
the time ratio fair. Then, per precision and batch: seconds per pair, UNet evaluations per pair (counted by a hook,
one per sample through the UNet), on a GPU the host-device synchronisations per step (torch.cuda's sync debug mode:
each is the host waiting for the GPU's queued work), peak memory, achieved TFLOP/s (torch.utils.flop_counter's
formulas over 1- and 2-step runs, scaled to the run's steps) against the device's measured matmul throughput, the
ratio reference / ours, and the hours 15,000 pairs would take at the paper's 100 inversion + 100 edit steps. The
compiled editor (generate.py's `compile=true`) is checked against the eager one's pair and timed after its first,
compiling run.

With `--editor`, each named teacher (a `conf/editor/` config, `NAME:INVERSION` for another inversion of real inputs)
is timed instead, beside pix2pix-zero in the same run on the same inputs: seconds and UNet evaluations per pair
(inversion included), and the ratio to pix2pix-zero's seconds. No reference loop exists for them: the tests hold their
parity (diffusers' img2img for SDEdit, the official control flow for Prompt-to-Prompt).
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from hydra import compose, initialize_config_dir
from transformers import CLIPTextConfig, CLIPTextModel

from bench.measure import count_flops, count_syncs, matmul_tflops, peak_memory, seconds, top_kernels
from bench.reference import AutogradRegularizer, ReferenceEditor
from bench.report import Report, script_arguments, set_threads
from datagen.backbone import Backbone, tiny_backbone
from datagen.editors import build_editor
from datagen.editors.base import EditBatch, Editor
from datagen.inversions import INVERTERS
from datagen.runtime import resolve_device
from datagen.editors.pix2pix_zero import Pix2PixZero
from datagen.inversions.ddim import NoiseRegularizer

PAPER_PAIRS, PAPER_STEPS = 15_000, 100
PROMPT, TARGET_PROMPT = "a photo of a cat sitting on a sofa", "a photo of a dog sitting on a sofa"
CONF = Path(__file__).resolve().parents[1] / "conf"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCE_DTYPES = ("fp32", "fp16")  # the official code's default and its option
PARITY, TIMES, KERNELS = "Same pair from both editors (batch 1)", "Seconds per pair", "Top kernels by self time (1-step run)"
COMPILED = "Compiled UNet against eager (our editor, largest batch)"
EDITORS = "Teachers: seconds per pair"


@dataclasses.dataclass(frozen=True)
class Size:
    """An SD-1.x-layout backbone with random weights (3 cross-attention levels, then one without)."""

    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]
    text_dim: int
    text_layers: int
    text_heads: int
    resolution: int


SIZES = {
    "sd14": Size((320, 640, 1280, 1280), (128, 256, 512, 512), 768, 12, 12, 512),  # SD-1.4's shapes
    "small": Size((32, 64, 128, 128), (32, 32, 64, 64), 128, 2, 4, 128),  # CPU: 16 x 16 latents
}
TINY_RESOLUTION = 32  # datagen.backbone.tiny_backbone (the test suite's components): 16 x 16 latents
# A random UNet's cross-attention maps are near-uniform: at the smoke's 2 + 2 steps the guidance moves the pair by
# 4e-4, too little for the parity of both editors to tell a right guidance from none. Sharpened 3x it moves the
# pair by 0.2 while the editors still agree to 1e-5 (tests/test_bench.py).
SMOKE_SHARPENING = 3.0


def sd_shaped_backbone(size: Size, seed: int = 0) -> Backbone:
    """Random SD-1.x networks at `size`; tokenizer and DDIM schedule as in `tiny_backbone` (SD's own)."""
    base = tiny_backbone(seed)
    torch.manual_seed(seed)
    levels = len(size.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=size.resolution // 8, block_out_channels=size.unet_channels, cross_attention_dim=size.text_dim,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
    )
    vae = AutoencoderKL(
        block_out_channels=size.vae_channels, latent_channels=4, layers_per_block=2, sample_size=size.resolution,
        down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=size.text_dim, intermediate_size=4 * size.text_dim,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    return dataclasses.replace(base, unet=unet, vae=vae, text_encoder=text_encoder, name="random-sd")


class UNetSampleCounter:
    """Counts samples through the UNet inside the block: a guidance pair counts 2, as EditResult.unet_evals;
    `with_grad` counts those run with autograd on (each one is followed by a backward through the UNet)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet, self.count, self.with_grad = unet, 0, 0

    def __enter__(self) -> "UNetSampleCounter":
        self.handle = self.unet.register_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.handle.remove()

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.count += args[0].shape[0]
        self.with_grad += args[0].shape[0] if torch.is_grad_enabled() else 0


@dataclasses.dataclass
class Setup:
    backbone: Backbone
    direction: torch.Tensor
    images: torch.Tensor | None  # real inputs, N x 3 x R x R in [0, 1]; None for synthetic ones
    resolution: int
    steps: int

    def ours(self, steps: int | None = None, compile_backend: str | None = None, **options: Any) -> Pix2PixZero:
        """Our editor at the setup's (or `steps`) steps; `options` go to Pix2PixZero (e.g. xa_update)."""
        steps = steps or self.steps
        compile = {"backend": compile_backend} if compile_backend else False
        return Pix2PixZero(self.backbone, self.direction, self.resolution, steps, steps, regularizer=NoiseRegularizer(),
                           compile=compile, **options)

    def reference(self, steps: int | None = None) -> ReferenceEditor:
        steps = steps or self.steps
        return ReferenceEditor(self.backbone, self.direction, steps, steps, regularizer=AutogradRegularizer())

    def batch(self, first: int, size: int) -> EditBatch:
        images = None if self.images is None else self.images[first : first + size]
        return EditBatch(list(range(first, first + size)), [PROMPT] * size, images, [TARGET_PROMPT] * size)

    def teacher(self, spec: str) -> Editor:
        """The teacher `spec` names (`NAME` or `NAME:INVERSION`, NAME a conf/editor config) at the setup's steps."""
        name, _, inversion = spec.partition(":")
        cfg = editor_config(name)
        cfg.num_inference_steps = self.steps
        if "num_inversion_steps" in cfg:
            cfg.num_inversion_steps = self.steps
        if inversion:
            cfg.inversion = inversion
        return build_editor(cfg, self.backbone, self.resolution, lambda: self.direction)

    def run_ours(self, editor: Pix2PixZero, first: int, size: int) -> torch.Tensor:
        return editor.edit(self.batch(first, size)).edited

    def run_reference(self, editor: ReferenceEditor, noise_from: Pix2PixZero, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair `index` as the reference makes it; a synthetic one starts from our editor's noise for its seed."""
        if self.images is None:
            return editor.edit(PROMPT, x_T=noise_from.initial_noise([index]))
        return editor.edit(PROMPT, image=self.images[index : index + 1], seed=index)


def sharpen_cross_attention(unet: torch.nn.Module, factor: float) -> None:
    """Scales the query and key projections of every cross-attention (attn2) layer by `factor`, in place: its
    logits grow by factor^2, so its maps leave the near-uniform ones of random weights."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(factor)
                module.to_k.weight.mul_(factor)


def build_setup(size: str, inputs: str, pairs: int, steps: int, device: torch.device, sharpening: float = 1.0) -> Setup:
    """Random weights of `size` ("tiny": the test suite's), a random direction and, for real inputs, `pairs` random
    images, all from seed 0; with `sharpening`, the cross-attention sharpened (`sharpen_cross_attention`)."""
    backbone = (tiny_backbone(0) if size == "tiny" else sd_shaped_backbone(SIZES[size])).to(device, torch.float32)
    if sharpening != 1:
        sharpen_cross_attention(backbone.unet, sharpening)
    resolution = TINY_RESOLUTION if size == "tiny" else SIZES[size].resolution
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(1, 77, backbone.text_encoder.config.hidden_size, generator=generator)
    images = torch.rand(pairs, 3, resolution, resolution, generator=generator) if inputs == "real" else None
    return Setup(backbone, direction, images, resolution, steps)


@dataclasses.dataclass(frozen=True)
class PerPair:
    """A count over one pair (FLOPs, host-device synchronisations): a fixed part (text encoder, VAE, copies
    out) plus one part per inversion + edit step."""

    fixed: int
    per_step: int

    @classmethod
    def count(cls, counter: Callable[[Callable[[], object]], int], run: Callable[[int], object]) -> "PerPair":
        """From `counter`'s counts of `run(steps)` at 1 and 2 steps."""
        one, two = counter(lambda: run(1)), counter(lambda: run(2))
        return cls(fixed=one - (two - one), per_step=two - one)

    def at(self, steps: int) -> int:
        return self.fixed + steps * self.per_step


def bench_precision(setup: Setup, dtype_name: str, batches: Sequence[int], repeats: int, warmup: int,
                    with_reference: bool, report: Report, profile: bool, compile_backend: str | None = None) -> None:
    """Adds to `report` the parity of both editors and the rows of the reference (batch 1) and of ours at each
    batch in one precision; with `compile_backend`, ours with its UNet compiled at the largest batch (against the
    eager editor's pair); with `profile`, the top kernels of a 1-step run of each (ours at the largest batch)."""
    device, steps = setup.backbone.device, setup.steps
    setup.backbone.to(device, DTYPES[dtype_name])
    peak_tflops = matmul_tflops(device, DTYPES[dtype_name])

    def per_pair(run: Callable[[int], object]) -> tuple[PerPair, int | None]:
        """FLOPs of a pair, and on a GPU the synchronisations per step (each one a GPU drained by a host read),
        counted after the FLOP runs so that no first-call initialisation is among them."""
        flops = PerPair.count(count_flops, run)
        syncs = PerPair.count(lambda fn: count_syncs(fn, device), run).per_step if device.type == "cuda" else None
        return flops, syncs

    def measure(name: str, batch: int, call: Callable[[], object], counts: tuple[PerPair, int | None],
                unet: torch.nn.Module) -> dict:
        flops, syncs = counts
        for _ in range(warmup):
            call()
        # counted on the module the editor calls: a hook on a compiled UNet's inner module would recompile it
        with UNetSampleCounter(unet) as counter, peak_memory(device) as memory:
            per_pair = sum(seconds(call, device) for _ in range(repeats)) / (repeats * batch)
        achieved = flops.at(steps) / per_pair / 1e12
        # at the paper's steps, assuming the same FLOP/s: the fixed part weighs less than at few steps
        paper_seconds = per_pair * flops.at(PAPER_STEPS) / flops.at(steps)
        return {"editor": name, "precision": dtype_name, "batch": batch, "s/pair": per_pair,
                "UNet evals/pair": counter.count / (repeats * batch), "syncs/step": syncs, "peak GiB": memory["peak_gib"],
                "TFLOP/pair": flops.at(steps) / 1e12, "TFLOP/s": achieved, "% matmul peak": 100 * achieved / peak_tflops,
                "h per 15k pairs @100/100": paper_seconds * PAPER_PAIRS / 3600}

    ours = setup.ours()
    if with_reference:
        reference = setup.reference()
        reference_input, reference_edited = setup.run_reference(reference, ours, 0)
        result = ours.edit(setup.batch(0, 1))
        parity = {"precision": dtype_name, "max abs edited diff": (result.edited.cpu() - reference_edited.cpu()).abs().max().item()}
        if setup.images is None:  # real inputs are the image itself in both; synthetic ones are decoded
            parity["max abs input diff"] = (result.inputs.cpu() - reference_input.cpu()).abs().max().item()
        report.add(PARITY, parity)
        counts = per_pair(lambda k: setup.run_reference(setup.reference(k), ours, 0))
        report.add(TIMES, measure("reference", 1, lambda: setup.run_reference(reference, ours, 0), counts, setup.backbone.unet))
        if profile:
            report.add(KERNELS, *({"setting": f"reference {dtype_name} b1", **kernel}
                                  for kernel in top_kernels(lambda: setup.run_reference(setup.reference(1), ours, 0), device)))
    counts = per_pair(lambda k: setup.run_ours(setup.ours(k), 0, 1))  # a compiled UNet does the same arithmetic
    for batch in batches:
        report.add(TIMES, measure("ours", batch, lambda: setup.run_ours(ours, 0, batch), counts, setup.backbone.unet))
    if compile_backend:  # at the largest batch only: each batch size is another set of graphs to compile
        batch, compiled = max(batches), setup.ours(compile_backend=compile_backend)
        torch._dynamo.reset()  # compiled afresh, from no earlier precision's graphs
        eager_edited, compiled_edited = setup.run_ours(ours, 0, batch), []
        first_seconds = seconds(lambda: compiled_edited.append(setup.run_ours(compiled, 0, batch)), device)  # compiles
        report.add(COMPILED, {"precision": dtype_name, "batch": batch, "backend": compile_backend, "first run s": first_seconds,
                              "max abs edited diff": (compiled_edited[0] - eager_edited).abs().max().item()})
        report.add(TIMES, measure("ours compiled", batch, lambda: setup.run_ours(compiled, 0, batch), counts,
                                  compiled.backbone.unet))
    if profile:
        report.add(KERNELS, *({"setting": f"ours {dtype_name} b{max(batches)}", **kernel}
                              for kernel in top_kernels(lambda: setup.run_ours(setup.ours(1), 0, max(batches)), device)))


def editor_config(name: str):
    """conf/editor/NAME.yaml as generate.py composes it (its defaults list resolved)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("generate", [f"editor={name}"]).editor


def teacher_specs(requested: Sequence[str]) -> list[str]:
    """pix2pix-zero first, then the requested teachers; `all`: every conf/editor config with each inversion it takes
    (presets of another editor, such as `paper`, are left out: they time the same code)."""
    if list(requested) != ["all"]:
        return ["pix2pix_zero", *(spec for spec in requested if spec != "pix2pix_zero")]
    specs, targets = [], set()
    for path in sorted((CONF / "editor").glob("*.yaml"), key=lambda p: (p.stem != "pix2pix_zero", p.stem)):
        cfg = editor_config(path.stem)
        if cfg._target_ in targets:
            continue
        targets.add(cfg._target_)
        specs.append(path.stem)
        if "inversion" in cfg:
            specs += [f"{path.stem}:{inversion}" for inversion in INVERTERS if inversion != cfg.inversion]
    return specs


def bench_teachers(setup: Setup, dtype_name: str, specs: Sequence[str], batches: Sequence[int], repeats: int,
                   warmup: int, report: Report) -> None:
    """Adds to `report` a row per teacher and batch in one precision: seconds and UNet evaluations per pair (and
    the backward passes among them), seconds over pix2pix-zero's (the first spec) at the same batch and, for the
    inversions that time themselves (null-text, StyleDiffusion), the inversion's and the edit's share. A teacher
    that cannot take an inversion (its constructor says why) gets a row with the reason instead."""
    device = setup.backbone.device
    setup.backbone.to(device, DTYPES[dtype_name])
    baseline: dict[int, float] = {}
    for spec in specs:
        try:
            editor = setup.teacher(spec)
        except ValueError as error:
            report.add(EDITORS, {"editor": spec, "precision": dtype_name, "note": str(error).split(":")[0]})
            continue
        for batch in batches:
            results = []
            call = lambda: results.append(editor.edit(setup.batch(0, batch)))  # noqa: E731 - timed as a thunk
            for _ in range(warmup):
                call()
            with UNetSampleCounter(setup.backbone.unet) as counter, peak_memory(device) as memory:
                per_pair = sum(seconds(call, device) for _ in range(repeats)) / (repeats * batch)
            baseline.setdefault(batch, per_pair)
            timed = [r["inversion"]["seconds"] for r in results[-1].records if "seconds" in r.get("inversion", {})]
            inversion = sum(timed) / len(timed) if timed else None
            report.add(EDITORS, {"editor": spec, "precision": dtype_name, "batch": batch, "s/pair": per_pair,
                                 "x pix2pix-zero": per_pair / baseline[batch], "inversion s/pair": inversion,
                                 "edit s/pair": None if inversion is None else per_pair - inversion,
                                 "UNet evals/pair": counter.count / (repeats * batch),
                                 "UNet backwards/pair": counter.with_grad / (repeats * batch), "peak GiB": memory["peak_gib"]})


def add_ratios(rows: list[dict]) -> None:
    """ref/ours: the reference's seconds per pair at the same precision (fp16's for bf16) over ours."""
    reference = {row["precision"]: row["s/pair"] for row in rows if row["editor"] == "reference"}
    if "fp16" in reference:
        reference["bf16"] = reference["fp16"]
    for row in rows:
        if row["editor"] != "reference" and row["precision"] in reference:
            row["ref/ours"] = reference[row["precision"]] / row["s/pair"]


def arguments() -> argparse.ArgumentParser:
    """The command line (bench/gpu.sh's commands are checked against it in the tests)."""
    parser = script_arguments(__doc__, "generate", "tiny components (cross-attention sharpened), 2 steps, batches 1 and 2, fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", choices=[*SIZES, "tiny"], help="default: sd14 on a GPU, small on the CPU")
    parser.add_argument("--steps", type=int, help="inversion and edit steps (default: 50 on a GPU, 10 on the CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--precisions", nargs="+", choices=list(DTYPES), help="default: all on a GPU, fp32 on the CPU")
    parser.add_argument("--inputs", choices=["real", "synthetic"], default="real",
                        help="real: inversion + edit, as the paper's timing; synthetic: edit from seeded noise")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting")
    parser.add_argument("--warmup", type=int, help="untimed runs per setting (default: 1 on a GPU, 0 on the CPU)")
    parser.add_argument("--no-reference", action="store_true", help="time our editor only")
    parser.add_argument("--profile", action="store_true", help="also list the top kernels of a 1-step run (torch.profiler)")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="also time our editor with its UNet under torch.compile (default backend: inductor)")
    parser.add_argument("--editor", nargs="+", metavar="NAME[:INVERSION]",
                        help="time these teachers (conf/editor/ names; all: every one with every inversion) beside "
                             "pix2pix-zero, instead of pix2pix-zero against the reference loop")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.size, args.steps, args.batches, args.precisions = "cpu", "tiny", 2, [1, 2], ["fp32"]
    set_threads(args)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    size = args.size or ("sd14" if gpu else "small")
    steps = args.steps or (50 if gpu else 10)
    precisions = args.precisions or (list(DTYPES) if gpu else ["fp32"])
    if not gpu and precisions != ["fp32"]:
        parser.error("half precisions are measured on a GPU only (CPU half-precision kernels are not what runs at scale)")
    warmup = args.warmup if args.warmup is not None else int(gpu)
    diffusers_logging.set_verbosity_error()  # each precision change would warn that no module must stay fp32

    sharpening = SMOKE_SHARPENING if args.smoke else 1.0
    setup = build_setup(size, args.inputs, max(args.batches), steps, device, sharpening)
    backbone, resolution = setup.backbone, setup.resolution

    columns = ["editor", "precision", "batch", "s/pair", "ref/ours", "UNet evals/pair", "syncs/step", "peak GiB", "TFLOP/pair",
               "TFLOP/s", "% matmul peak", "h per 15k pairs @100/100"]
    notes = [f"{size} random-weight UNet ({sum(p.numel() for p in backbone.unet.parameters()) / 1e6:.1f} M parameters), "
             f"{resolution} px, {args.inputs} inputs, {steps} inversion + {steps} edit steps, guidance 5.0, "
             f"xa_guidance {0.1 if args.inputs == 'real' else 0.15}"
             + (f", cross-attention sharpened {sharpening:g}x" if sharpening != 1 else ""),
             "ref/ours: the reference's s/pair at the same precision (fp16's for bf16) / ours; hours: s/pair "
             "scaled by FLOPs to 100 + 100 steps, x 15,000 pairs, on this device"]
    report = Report("generate", args.out, device, {
        PARITY: ["precision", "max abs input diff", "max abs edited diff"], TIMES: columns,
        COMPILED: ["precision", "batch", "backend", "first run s", "max abs edited diff"],
        KERNELS: ["setting", "kernel", "calls", "ms", "share %"],
        EDITORS: ["editor", "precision", "batch", "s/pair", "x pix2pix-zero", "inversion s/pair", "edit s/pair",
                  "UNet evals/pair", "UNet backwards/pair", "peak GiB", "note"]},
        notes, smoke=args.smoke)
    if args.editor:
        specs = teacher_specs(args.editor)
        for name in precisions:
            bench_teachers(setup, name, specs, args.batches, args.repeats, warmup, report)
        return report.finish()
    for name in precisions:
        with_reference = not args.no_reference and name in REFERENCE_DTYPES
        bench_precision(setup, name, args.batches, args.repeats, warmup, with_reference, report, args.profile, args.compile)
    add_ratios(report.rows(TIMES))
    return report.finish()

if __name__ == "__main__":
    main()
