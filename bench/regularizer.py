"""Noise regularizer benchmark: the DDIM inversion's autocorrelation + KL steps, ours against autograd's.

    python -m bench.regularizer            # SD latents (4 x 64 x 64, 512 px), batches 1 and 8
    python -m bench.regularizer --smoke    # 4 x 16 x 16, batches 1 and 2: seconds on a CPU

One call regularizes one inversion step's noise: 5 x (5 autocorrelation steps + 1 KL step) over a 4-level
pyramid, no UNet. Ours (`datagen.inversions.ddim.NoiseRegularizer`) draws the offsets of the whole call at once,
copies them to the device once without waiting, and steps on written-out gradients; the reference
(`bench.reference.AutogradRegularizer`, as the official code) takes each gradient with autograd. On a GPU such
small maps make the call launch-bound: the ops it dispatches, and the times it makes the host wait for the
device, are what it costs, so both are counted (syncs with torch.cuda's sync debug mode, on a GPU).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.measure import OpCount, count_syncs, latency
from bench.reference import AutogradRegularizer
from bench.report import Report, script_arguments, set_threads
from datagen.inversions.ddim import NoiseRegularizer
from datagen.runtime import resolve_device

TABLE = "Noise regularizer, one inversion step"
PAPER_STEPS = 100


def arguments() -> argparse.ArgumentParser:
    """The command line (bench/gpu.sh's commands are checked against it in the tests)."""
    parser = script_arguments(__doc__, "regularizer", "4 x 16 x 16 maps, batches 1 and 2, 3 timed calls")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=64, help="latent width (64: SD at 512 px)")
    parser.add_argument("--iterations", type=int, default=20, help="timed calls per setting (after 3 untimed)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = arguments().parse_args(argv)
    if args.smoke:
        args.device, args.batches, args.size, args.iterations = "cpu", [1, 2], 16, 3
    set_threads(args)
    device = resolve_device(args.device)
    columns = ["regularizer", "batch", "ms/call", "ms/sample", "ops/call", "syncs/call", "max abs diff",
               f"s/pair @{PAPER_STEPS} steps"]
    report = Report("regularizer", args.out, device, {TABLE: columns}, [
        f"noise B x 4 x {args.size} x {args.size} (fp32, spatially correlated), lambda_ac = lambda_kl = 20, 5 x (5 + 1) steps; "
        "ms/call: median of CUDA-event or wall times; ops: aten ops dispatched (views and random draws left out); "
        f"s/pair: ms/sample x {PAPER_STEPS} inversion steps"], smoke=args.smoke)
    for batch in args.batches:
        noise = torch.randn(batch, 4, args.size, args.size, generator=torch.Generator().manual_seed(batch))
        noise = (noise + noise.roll(1, 2) + noise.roll(1, 3)).to(device)  # correlated, as a UNet's prediction is
        expected = None
        for name, regularizer in (("autograd (reference)", AutogradRegularizer()), ("ours", NoiseRegularizer())):
            call = lambda: regularizer(noise, [torch.Generator().manual_seed(i) for i in range(batch)])  # noqa: E731
            out = call()
            expected = out if expected is None else expected
            with OpCount() as ops:
                call()
            timing = latency(call, device, warmup=3, iterations=args.iterations)
            report.add(TABLE, {"regularizer": name, "batch": batch, "ms/call": timing.median_ms,
                               "ms/sample": timing.median_ms / batch, "ops/call": ops.count,
                               "syncs/call": count_syncs(call, device),
                               "max abs diff": (out - expected).abs().max().item(),
                               f"s/pair @{PAPER_STEPS} steps": timing.median_ms / batch * PAPER_STEPS / 1e3})
    return report.finish()


if __name__ == "__main__":
    main()
