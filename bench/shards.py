"""Shard writing benchmark: what PNG encoding costs the generation loop, inline or on encoder threads.

    python -m bench.shards             # 512 px pairs, batches of 8
    python -m bench.shards --smoke     # 64 px, batches of 2: seconds on a CPU

A generation worker edits a batch, then writes its pairs (two PNGs each: ~50-100 ms per 512 px image on one
core). Inline, the next batch starts only when they are encoded: on a GPU the device idles meanwhile. With the
encoder threads `datagen.job.Worker` uses, `ShardWriter.write` returns at once and the encoding overlaps the
next batch. Here a fixed amount of matrix work on one torch thread stands in for a batch's editing (a GPU
run's host mostly waits, holding no core it needs); same images, same shard bytes in both modes (checked).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.measure import seconds
from bench.report import Report, script_arguments
from datagen.shards import ShardWriter

TABLE = "Writing pairs beside the editing"


def arguments() -> argparse.ArgumentParser:
    parser = script_arguments(__doc__, "shards", "64 px, 3 batches of 2")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--edit-work", type=int, default=40, help="1024^2 matmuls standing in for a batch's editing")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = arguments().parse_args(argv)
    if args.smoke:
        args.resolution, args.batch_size, args.batches, args.edit_work = 64, 2, 3, 2
    torch.set_num_threads(args.threads or 1)  # the editing stand-in holds one core, as a GPU worker's host loop does
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(args.batches, args.batch_size, 3, args.resolution // 16, args.resolution // 16, generator=generator)
    images = torch.nn.functional.interpolate(low.flatten(0, 1), size=args.resolution, mode="bicubic").clamp(0, 1)
    images = images.view(args.batches, args.batch_size, 3, args.resolution, args.resolution)
    matrix = torch.randn(1024, 1024, generator=generator)

    def edit() -> None:
        for _ in range(args.edit_work):
            matrix @ matrix

    def run(encoder: ThreadPoolExecutor | None, folder: Path) -> tuple[float, float, str]:
        """Wall seconds for all batches, seconds the loop spent in writing, the shard's SHA-256."""
        writer, writing, start = ShardWriter(folder, 0, encoder), 0.0, time.perf_counter()
        for b, batch in enumerate(images):
            edit()
            began = time.perf_counter()
            for i, image in enumerate(batch):
                writer.write(f"{b * args.batch_size + i:09d}", image, 1 - image, {"batch": b})
            writing += time.perf_counter() - began
        began = time.perf_counter()
        record = writer.close()
        return time.perf_counter() - start, writing + time.perf_counter() - began, record.sha256

    report = Report("shards", args.out, torch.device("cpu"), {TABLE: [
        "writer", "resolution", "batch", "edit s/batch", "s/batch", "writing s/batch", "ms/pair in writing", "same bytes"]},
        [f"{args.batches} batches; editing stand-in: {args.edit_work} 1024^2 fp32 matmuls on one torch thread; "
         "writing: time the loop spent in ShardWriter.write and close (what a GPU would idle for)"], smoke=args.smoke)
    edit_seconds = seconds(edit, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as folder:
        inline = run(None, Path(folder) / "inline")
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="png") as encoder:
            threaded = run(encoder, Path(folder) / "threads")
    for name, (wall, writing, sha) in (("inline", inline), ("2 encoder threads", threaded)):
        report.add(TABLE, {"writer": name, "resolution": args.resolution, "batch": args.batch_size,
                           "edit s/batch": edit_seconds, "s/batch": wall / args.batches,
                           "writing s/batch": writing / args.batches,
                           "ms/pair in writing": 1e3 * writing / (args.batches * args.batch_size),
                           "same bytes": sha == inline[2]})
    return report.finish()


if __name__ == "__main__":
    main()
