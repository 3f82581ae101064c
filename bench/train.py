"""Distillation throughput: images/s of the training step, and of one data-loader worker (decode + augment).

    python -m bench.train                       # the 256 preset at batch 64 (the paper's) on a GPU, 16 on the CPU
    python -m bench.train --smoke               # the small preset, CPU, seconds

Everything is composed from conf/train.yaml as `python train.py` composes it, with the generator and
discriminator preset given, and LPIPS's VGG trunk random (offline; the same FLOPs). The step is timed inside
a Lightning fit on one batch held in memory, so only compute counts; lazy R1 steps (every r1_interval-th)
are in the mean and out of the median. The loader is timed in this process on pair shards written to a
temporary folder: what one DataLoader worker does. Training is data-bound when the configured workers
deliver fewer images/s than the step consumes.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from bench.measure import peak_memory, synchronize
from bench.report import Report, script_arguments, set_threads
from distill.data import PairStream

CONF = Path(__file__).resolve().parent.parent / "conf"
THROUGHPUT = "Distillation throughput"


def train_config(preset: str, out_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[
            f"data.path={out_dir}", f"out_dir={out_dir}", f"generator@distill.generator={preset}",
            f"discriminator@distill.discriminator={preset}", "distill.lpips_pretrained_vgg=false", *overrides])


def write_pair_shards(folder: Path, count: int, resolution: int, per_shard: int = 16) -> list[str]:
    """Smooth random image pairs as PNG in webdataset shards: they compress and decode like photos, not noise."""
    generator = torch.Generator().manual_seed(0)
    urls = []
    for first in range(0, count, per_shard):
        url = str(folder / f"pairs-{first // per_shard:06d}.tar")
        with wds.TarWriter(url) as writer:
            for index in range(first, min(first + per_shard, count)):
                coarse = torch.rand(2, 3, 8, 8, generator=generator)
                pair = F.interpolate(coarse, size=resolution, mode="bicubic", align_corners=False).clamp(0, 1)
                image, edited = (pair.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
                writer.write({"__key__": f"{index:08d}", "input.png": image, "edited.png": edited, "json": {"scores": {}}})
        urls.append(url)
    return urls


def loader_images_per_second(cfg: DictConfig, urls: list[str], batches: int) -> float:
    """One worker's rate: tar reading, PNG decoding, paired augmentation and collation, in this process."""
    stream = PairStream(urls, {}, instantiate(cfg.data.augment), train=True, seed=0, shuffle_buffer=cfg.data.shuffle_buffer,
                        batch_size=cfg.data.batch_size)
    batch_iter = iter(DataLoader(stream, batch_size=cfg.data.batch_size, num_workers=0))
    next(batch_iter)  # the first batch also fills the shuffle buffer
    start = time.perf_counter()
    for _ in range(batches):
        next(batch_iter)
    return batches * cfg.data.batch_size / (time.perf_counter() - start)


class StepTimer(pl.Callback):
    """Wall time of each training step after `warmup` steps, the device's queued work included."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.r1_steps = warmup, [], []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: dict, batch_idx: int) -> None:
        synchronize(module.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch: dict, batch_idx: int) -> None:
        synchronize(module.device)
        step = trainer.global_step - 1  # already counted the step that just ended
        if step >= self.warmup:
            self.times.append(time.perf_counter() - self.start)
            self.r1_steps.append(module.D is not None and step % module.hparams.r1_interval == 0)


def timed_fit(cfg: DictConfig, warmup: int, steps: int, callbacks: Sequence[pl.Callback] = ()) -> StepTimer:
    """`warmup` + `steps` distillation steps on one in-memory batch, repeated, timed after the warmup: compute alone,
    the host-to-device copy included. `callbacks` join the fit (a test watches the steps with them)."""
    module = instantiate(cfg.distill)
    batch_size, resolution = cfg.data.batch_size, cfg.distill.generator.resolution
    pixels = torch.rand(2, batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"input": pixels[0], "target": pixels[1]}
    timer = StepTimer(warmup)
    trainer = instantiate(cfg.trainer, max_steps=warmup + steps, logger=False, callbacks=[timer, *callbacks],
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0, val_check_interval=None)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * (warmup + steps), batch_size=None))
    return timer


def step_rates(timer: StepTimer, batch_size: int) -> dict[str, float]:
    """The median step over the steps without lazy R1 (all steps if each had it), and the mean rate over all."""
    plain = [t for t, r1 in zip(timer.times, timer.r1_steps) if not r1] or timer.times
    return {"median step s": statistics.median(plain), "train images/s": batch_size / statistics.median(plain),
            "train images/s incl. R1": batch_size * len(timer.times) / sum(timer.times)}


def arguments() -> argparse.ArgumentParser:
    """The command line (bench/gpu.sh's commands are checked against it in the tests)."""
    parser = script_arguments(__doc__, "train", "small preset, batch 4, 2 + 2 steps, CPU")
    parser.add_argument("--presets", nargs="+", default=["comodgan_256"], help="conf/generator and conf/discriminator presets")
    parser.add_argument("--batch-size", type=int, nargs="+", help="one or more (default: 64 on a GPU, the paper's; 16 on the CPU)")
    parser.add_argument("--precisions", nargs="+", help="Lightning precisions (default: bf16-mixed and 32-true on a GPU, 32-true on the CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--loader-batches", type=int, default=8, help="timed loader batches")
    parser.add_argument("--adversarial-weight", type=float, help="default: the distill config's (0 = no discriminator)")
    parser.add_argument("--channels-last", nargs="+", choices=["false", "true"], default=["false"],
                        help="distill.channels_last setting(s) to time (NHWC G, D, LPIPS and batches)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = arguments().parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.presets, args.batch_size, args.precisions = ["small"], [4], ["32-true"]
        args.warmup, args.steps, args.loader_batches = 1, 2, 2
    set_threads(args)
    batch_sizes = args.batch_size or [64 if gpu else 16]
    precisions = args.precisions or (["bf16-mixed", "32-true"] if gpu else ["32-true"])

    device = torch.device("cuda" if gpu else "cpu")
    columns = ["preset", "res", "precision", "batch", "channels last", "adversarial", "median step s", "train images/s",
               "train images/s incl. R1", "peak GiB", "loader images/s per worker", "workers needed", "workers configured",
               "bound by", "note"]
    notes = [f"{args.warmup} warm-up + {args.steps} timed steps; loader: {args.loader_batches} batches after the "
             "first, decode + augment (conf/data/pairs.yaml) in one process"]
    report = Report("train", args.out, device, {THROUGHPUT: columns}, notes, smoke=args.smoke)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for preset, batch_size, precision, channels_last in itertools.product(args.presets, batch_sizes, precisions,
                                                                              args.channels_last):
            overrides = [f"data.batch_size={batch_size}", f"trainer={'gpu' if gpu else 'cpu'}",
                         f"trainer.precision={precision}", f"data.shuffle_buffer={batch_size}",
                         f"distill.channels_last={channels_last}"]
            if args.adversarial_weight is not None:
                overrides.append(f"distill.adversarial_weight={args.adversarial_weight}")
            cfg = train_config(preset, Path(tmp) / preset, overrides)
            row = {"preset": preset, "res": cfg.distill.generator.resolution, "precision": precision,
                   "batch": batch_size, "channels last": cfg.distill.channels_last,
                   "adversarial": cfg.distill.adversarial_weight > 0}
            shard_dir = Path(tmp) / preset / f"shards-{batch_size}"
            if not shard_dir.exists():
                shard_dir.mkdir(parents=True)
                write_pair_shards(shard_dir, (args.loader_batches + 1) * batch_size, cfg.distill.generator.resolution)
            per_worker = loader_images_per_second(cfg, sorted(str(p) for p in shard_dir.glob("*.tar")), args.loader_batches)
            try:
                with peak_memory(device) as memory:
                    step = step_rates(timed_fit(cfg, args.warmup, args.steps), batch_size)
            except torch.OutOfMemoryError:  # a batch too large for this device: say so, go on to the next setting
                torch.cuda.empty_cache()
                report.add(THROUGHPUT, {**row, "loader images/s per worker": per_worker, "note": "out of memory"})
                continue
            needed = step["train images/s"] / per_worker
            report.add(THROUGHPUT, {**row, **step, "peak GiB": memory["peak_gib"],
                                    "loader images/s per worker": per_worker, "workers needed": needed,
                                    "workers configured": cfg.data.num_workers,
                                    "bound by": "data" if needed > cfg.data.num_workers else "compute"})
    return report.finish()


if __name__ == "__main__":
    main()
