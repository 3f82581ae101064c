"""Latency of the distilled Co-Mod-GAN generator (eval mode) as eager PyTorch, TorchScript and torch.compile
(and, on a CPU with onnxruntime installed, as export.py's ONNX file under onnxruntime).

    python -m bench.latency                     # 256 and 512 presets, batch 1 and 8, every precision the device has
    python -m bench.latency --smoke             # the small preset (64 px), CPU, seconds

The generator is built from its conf/generator preset with random weights (latency does not depend on
them) and scripted with torch.jit.script, as an export does. Per setting: median and p95 latency of one
batch after warm-up (CUDA events on a GPU), milliseconds per image, images per second, and the largest
difference to the eager output (each mode must compute the same images).
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from bench.measure import latency, top_kernels
from bench.report import Report, script_arguments, set_threads
from datagen.runtime import resolve_device
from distill.export import save_onnx

CONF = Path(__file__).resolve().parent.parent / "conf"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_generator(preset: str, grouped_modconv: bool) -> nn.Module:
    """The eval-mode generator of conf/generator/<preset>.yaml."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name=f"generator/{preset}", overrides=[f"generator.grouped_modconv={grouped_modconv}"])
    return instantiate(cfg.generator).eval().requires_grad_(False)


def onnxruntime_session(generator: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fp32 generator as export.py writes its ONNX file (parity-checked), run by onnxruntime's CPU provider
    with torch's thread count."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    with tempfile.TemporaryDirectory() as folder:  # the session holds the model once made: the file can go
        path = Path(folder) / "generator.onnx"
        save_onnx(generator, path, torch.float32, torch.device("cpu"))
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda image: torch.from_numpy(session.run(None, {"image": image.contiguous().numpy()})[0])


def compiled_modes(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[nn.Module], Callable]]:
    """How each mode the device has at `dtype` turns the eager generator into what is timed."""
    modes = {
        "eager": lambda g: g,
        "torchscript": torch.jit.script,
        "compile": torch.compile,
    }
    if device.type == "cuda":  # "reduce-overhead" replays CUDA graphs: no launch cost per kernel
        modes["compile-cudagraphs"] = lambda g: torch.compile(g, mode="reduce-overhead")
    elif dtype == torch.float32 and all(importlib.util.find_spec(name) for name in ("onnxscript", "onnxruntime")):
        modes["onnxruntime"] = onnxruntime_session  # onnxruntime's CPU convolutions are fp32
    return modes


LATENCY, KERNELS = "Generator latency", "Top kernels by self time (one call)"


def bench_generator(generator: nn.Module, name: str, device: torch.device, dtype_name: str, batches: Sequence[int],
                    modes: Sequence[str] | None, channels_last: bool, warmup: int, iterations: int, report: Report,
                    profile: bool) -> None:
    """Adds to `report` a row per batch and mode (None: every mode the device has at this precision); with
    `profile`, also each setting's top kernels."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = generator.to(device=device, dtype=DTYPES[dtype_name], memory_format=memory_format)
    build, runners = compiled_modes(device, DTYPES[dtype_name]), {}
    for batch in batches:
        resolution = generator.resolution
        image = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        image = image.to(device=device, dtype=DTYPES[dtype_name], memory_format=memory_format)
        with torch.inference_mode():
            expected = generator(image).float()
        for mode in modes or build:
            row = {"generator": name, "res": resolution, "precision": dtype_name, "batch": batch, "mode": mode}
            if mode not in build:
                report.add(LATENCY, {**row, "note": f"not available on {device.type} in {dtype_name}"})
                continue
            try:
                if mode not in runners:  # built once per precision, on first use: a failure is that row's note
                    runners[mode] = build[mode](generator)
                runner = runners[mode]
                with torch.inference_mode():
                    difference = (runner(image).float() - expected).abs().max().item()
                    timing = latency(lambda: runner(image), device, warmup, iterations)
            except Exception as error:  # e.g. torch.compile without a working compiler: report, go on
                report.add(LATENCY, {**row, "note": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"})
                continue
            report.add(LATENCY, {**row, "median ms": timing.median_ms, "p95 ms": timing.p95_ms,
                                 "ms/image": timing.median_ms / batch, "images/s": 1e3 * batch / timing.median_ms,
                                 "max abs diff vs eager": difference})
            if profile:
                with torch.inference_mode():
                    report.add(KERNELS, *({"setting": f"{name} {dtype_name} b{batch} {mode}", **kernel}
                                          for kernel in top_kernels(lambda: runner(image), device, count=5)))


def arguments() -> argparse.ArgumentParser:
    """The command line (bench/gpu.sh's commands are checked against it in the tests)."""
    parser = script_arguments(__doc__, "latency", "small preset, batch 1 and 2, fp32, eager and TorchScript, CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", nargs="+", default=["comodgan_256", "comodgan_512"], help="conf/generator presets")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precisions", nargs="+", choices=list(DTYPES), help="default: fp32 fp16 bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--modes", nargs="+", choices=["eager", "torchscript", "compile", "compile-cudagraphs", "onnxruntime"],
                        help="default: all the device has at each precision (onnxruntime: CPU, fp32, when installed)")
    parser.add_argument("--grouped-modconv", choices=["false", "true"], nargs="+", default=["false"],
                        help="the preset's modulated-convolution execution(s) to time")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also list each setting's top 5 kernels (torch.profiler)")
    parser.add_argument("--warmup", type=int, help="untimed calls per setting (default: 20 on a GPU, 2 on the CPU)")
    parser.add_argument("--iterations", type=int, help="timed calls per setting (default: 100 on a GPU, 10 on the CPU)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = arguments().parse_args(argv)
    if args.smoke:
        args.device, args.presets, args.batches, args.precisions = "cpu", ["small"], [1, 2], ["fp32"]
        args.modes, args.warmup, args.iterations = ["eager", "torchscript"], 1, 3
    set_threads(args)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    precisions = args.precisions or (list(DTYPES) if gpu else ["fp32"])
    warmup = args.warmup if args.warmup is not None else (20 if gpu else 2)
    iterations = args.iterations or (100 if gpu else 10)

    columns = ["generator", "res", "precision", "batch", "mode", "median ms", "p95 ms", "ms/image", "images/s",
               "max abs diff vs eager", "note"]
    notes = [f"eval mode, random weights, {'channels_last' if not args.no_channels_last else 'contiguous'}, "
             f"{warmup} warm-up + {iterations} timed calls per setting"]
    report = Report("latency", args.out, device, {LATENCY: columns, KERNELS: ["setting", "kernel", "calls", "ms", "share %"]},
                    notes, smoke=args.smoke)
    for preset in args.presets:
        for grouped in args.grouped_modconv:
            name = preset + (" grouped" if grouped == "true" else "")
            for dtype_name in precisions:
                generator = build_generator(preset, grouped == "true")
                bench_generator(generator, name, device, dtype_name, args.batches, args.modes, not args.no_channels_last,
                                warmup, iterations, report, args.profile)
    return report.finish()

if __name__ == "__main__":
    main()
