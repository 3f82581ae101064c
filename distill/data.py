"""Pairs for distillation: webdataset shards streamed, selected by score thresholds while reading,
split across ranks and workers, and augmented identically on input and target.

The stream of one DataLoader worker of one rank:

    shards i with i % num_workers == worker         (fixed, so every epoch of a worker has one length)
    -> epoch e: those shards in an order drawn from (seed, e)
    -> tar samples -> score thresholds (+ the held-out split) -> the j-th kept pair goes to rank j % world_size
    -> shuffle buffer seeded by (seed, e, rank, worker) -> decode -> augmentation seeded by (seed, e, key)

Every rank reads every shard and keeps every world_size-th pair: the ranks get equal shares (within one
pair) whatever the thresholds keep, and no pair is seen twice in an epoch, at the price of reading the
shards world_size times. Training streams never end (epoch follows epoch), so no rank runs dry while the
others wait in a collective; the run is counted in steps. Because an epoch is a pure function of
(seed, epoch, rank, worker), batch n onward can be reproduced without replaying history: each worker
skips the samples that batches 0..n-1 took from it, before decoding (see ``PairStream.start_batch``).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from glob import glob
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import webdataset as wds
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms import v2

from filters.thresholds import passes

log = logging.getLogger(__name__)


class PairDataError(RuntimeError):
    """The shards or thresholds give nothing to train on, or a batch does not split over the devices."""


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts; the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_urls(path: str | Sequence[str]) -> list[str]:
    """Shard list from a generation output directory, a local glob or brace pattern, or a `pipe:`/URL spec.

    A directory means its `shards/*.tar` (or `*.tar` directly in it); several specs are concatenated.
    """
    specs = [path] if isinstance(path, str) else list(path)
    urls: list[str] = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith("pipe:") or "://" in spec:
            urls += wds.shardlists.expand_urls(spec)
            continue
        local = Path(spec).expanduser()
        if local.is_dir():
            shard_dir = local / "shards" if (local / "shards").is_dir() else local
            found = sorted(str(p) for p in shard_dir.glob("*.tar"))
        else:
            found = sorted(itertools.chain.from_iterable(glob(p) for p in wds.shardlists.expand_urls(str(local))))
        if not found:
            raise PairDataError(f"no shards found for data path {spec!r} (expected a generation output "
                                f"directory with shards/*.tar, a glob, or a pipe:/URL shard spec)")
        urls += found
    return urls


def recorded_thresholds(path: str | Sequence[str]) -> dict[str, float | None]:
    """The task thresholds recorded in the `config.yaml` of the generation output directories in `path`."""
    specs = [path] if isinstance(path, str) else list(path)
    found: dict[str, dict] = {}
    for spec in specs:
        config = Path(str(spec)).expanduser() / "config.yaml"
        if config.is_file():
            task = OmegaConf.load(config).get("task") or {}
            found[str(spec)] = OmegaConf.to_container(task.get("thresholds") or OmegaConf.create({}))
    if len({json.dumps(t, sort_keys=True) for t in found.values()}) > 1:
        raise PairDataError(f"the generation runs in data.path record different thresholds {found}; "
                            f"choose with data.thresholds={{name: minimum, ...}} or task=NAME")
    return next(iter(found.values()), {})


class PairAugment:
    """The same random crop, flip and colour jitter on input and target; additive noise on the input only.

    Works on float images in [0, 1]. The crop is square and resized to `resolution`, so it also brings
    pairs generated at another resolution to the generator's. Zero strengths switch a part off. `rotate90` also
    turns both by a random multiple of 90 degrees: with the flip, all 8 symmetries of the square, for data whose
    edits look the same turned (the toy world's axis-aligned shapes; not photographs, which have an up).
    `noise_std` is in the generator's [-1, 1] units, the ones the config and the paper speak in.
    """

    def __init__(self, resolution: int, crop_scale: Sequence[float] = (0.8, 1.0), flip: bool = True,
                 brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                 noise_std: float = 0.0, rotate90: bool = False):
        # transforms.v2 draws one set of parameters per call and applies it to every image passed together
        self.shared = v2.Compose([
            v2.RandomResizedCrop(resolution, scale=tuple(crop_scale), ratio=(1.0, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5 if flip else 0.0),
            v2.ColorJitter(brightness, contrast, saturation, hue),
        ])
        self.noise_std, self.rotate90 = noise_std, rotate90

    def __call__(self, image: torch.Tensor, target: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):  # the training RNG stays untouched in the main process
            torch.manual_seed(seed)
            image, target = self.shared(tv_tensors.Image(image), tv_tensors.Image(target))
            if self.rotate90:
                turns = int(torch.randint(4, ()))
                image, target = image.rot90(turns, (-2, -1)), target.rot90(turns, (-2, -1))
            # [0, 1] here, [-1, 1] for the generator: half the std here is noise_std there
            image = image.as_subclass(torch.Tensor) + self.noise_std / 2 * torch.randn_like(image)
        return image, target.as_subclass(torch.Tensor)


class PairStream(IterableDataset):
    """Samples {"input", "target", "key"}, images 3 x R x R in [-1, 1], as the module doc describes.

    `holdout` picks a fixed share of keys for validation: True keeps only those, False drops them,
    None ignores the split. `rank`, `world_size` and `start_batch` are set by the data module before
    the loader starts, `start_batch` being the number of batches of this rank already trained on.
    """

    def __init__(self, urls: Sequence[str], thresholds: Mapping[str, float | None], transform: PairAugment,
                 train: bool, seed: int = 0, shuffle_buffer: int = 1000, holdout: bool | None = None,
                 holdout_fraction: float = 0.0, batch_size: int = 1):
        super().__init__()
        self.urls, self.thresholds, self.transform = list(urls), dict(thresholds), transform
        self.train, self.seed, self.shuffle_buffer, self.batch_size = train, seed, shuffle_buffer, batch_size
        self.holdout, self.holdout_fraction = holdout, holdout_fraction
        self.rank, self.world_size, self.start_batch = 0, 1, 0
        self.decode = wds.autodecode.imagehandler("torchrgb")  # PNG -> 3 x H x W float in [0, 1]

    def is_held_out(self, key: str) -> bool:
        return stable_seed("holdout", key) < self.holdout_fraction * 2**63

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.train:
            # batches go round-robin over workers, so in a run from batch 0 worker w makes batches w, w + W, ...;
            # a loader started at batch n begins with its worker 0, which must play worker n % W's part
            worker = (worker + self.start_batch) % num_workers
        shards = self.urls[worker::num_workers]
        if not self.train:
            yield from (self.prepare(sample, 0) for sample in self.selected(shards, 0, worker))
            return
        skip = len(range(worker, self.start_batch, num_workers)) * self.batch_size
        epoch = 0
        if skip:
            epoch, skip = divmod(skip, self.count(shards, worker))
        for epoch in itertools.count(epoch):
            produced = 0
            for sample in itertools.islice(self.selected(shards, epoch, worker), skip, None):
                produced += 1
                yield self.prepare(sample, epoch)
            if not produced:
                raise self.empty(shards)
            skip = 0

    def count(self, shards: list[str], worker: int) -> int:
        """Pairs in one epoch of this rank and worker (a pass over the tars without decoding)."""
        count = sum(1 for _ in self.selected(shards, 0, worker, quiet=True))
        if not count:
            raise self.empty(shards)
        return count

    def empty(self, shards: list[str]) -> PairDataError:
        return PairDataError(f"no pair for rank {self.rank} of {self.world_size} in shards {shards[0]} ... "
                             f"{shards[-1]} passes the thresholds {self.thresholds}")

    def selected(self, shards: list[str], epoch: int, worker: int, quiet: bool = False) -> Iterator[dict]:
        """This rank's pairs of one epoch, in epoch order, not yet decoded."""
        if self.train:
            shards = random.Random(stable_seed(self.seed, "shards", epoch, worker)).sample(shards, len(shards))
        samples = wds.tarfile_to_samples()({"url": url} for url in shards)
        report = f"{len(shards)} shards of worker {worker}" if not quiet and epoch == 0 and self.rank == 0 else None
        kept = itertools.islice(self.select(samples, report), self.rank, None, self.world_size)
        if self.train:
            kept = wds.shuffle(self.shuffle_buffer, seed=stable_seed(self.seed, "buffer", epoch, self.rank, worker))(kept)
        return kept

    def select(self, samples: Iterator[dict], report: str | None) -> Iterator[dict]:
        """Pairs of this split that pass the thresholds; with `report`, logs the counts once they are known."""
        counts: Counter[str] = Counter()
        for sample in samples:
            counts["read"] += 1
            if self.holdout is not None and self.is_held_out(sample["__key__"]) != self.holdout:
                continue
            counts["offered"] += 1
            sample["meta"] = json.loads(sample["json"])  # parsed once: `prepare` reads it too
            kept, reasons = passes(sample["meta"].get("scores", {}), self.thresholds)
            counts.update(f"failed {reason.split(':')[0]}" for reason in reasons)
            if kept:
                counts["kept"] += 1
                yield sample
        if report:
            failed = {name: n for name, n in counts.items() if name.startswith("failed")}
            other_split = f", {counts['read'] - counts['offered']} belong to the other split" if self.holdout is not None else ""
            log.info("%s pairs: kept %d of %d read from %s%s (thresholds %s: %s)",
                     "training" if self.train else "validation", counts["kept"], counts["read"], report, other_split,
                     self.thresholds, failed or "none failed")

    def prepare(self, sample: dict, epoch: int) -> dict:
        image, target = self.decode("input.png", sample["input.png"]), self.decode("edited.png", sample["edited.png"])
        image, target = self.transform(image, target, stable_seed(self.seed, "augment", epoch, sample["__key__"]))
        meta = sample["meta"]
        # the source prompt and word: what StyleDiffusion's NS-LPIPS inverts the input with (evaluation.ns_lpips)
        prompt = meta.get("caption", meta.get("prompt", ""))
        return {"input": image * 2 - 1, "target": target * 2 - 1, "key": sample["__key__"], "prompt": prompt,
                "source_word": meta.get("source_word", "")}


def per_device(batch_size: int, world_size: int, name: str) -> int:
    """One process's share of a global batch; refused unless it divides evenly, as otherwise a step would not
    average the batch the config (and the lr chosen for it) names."""
    if batch_size % world_size:
        raise PairDataError(f"data.{name}={batch_size} is the global batch, over all devices, and does not divide "
                            f"over {world_size} devices; choose a multiple of {world_size}")
    return batch_size // world_size


class PairDataModule(pl.LightningDataModule):
    """Training and validation streams over pair shards (see the module doc).

    Validation holds out `holdout_fraction` of the pairs of `path` (chosen by a hash of the key, so it
    is the same set on every rank and every run), unless `val_path` names other shards to validate on.
    `thresholds` (score name -> minimum, None = off) default to those recorded by the generation run.
    `batch_size` and `val_batch_size` are global, over all devices (the paper's 64 is one optimizer step's
    batch): each of the trainer's `world_size` processes loads `batch_size / world_size` pairs per step.
    """

    def __init__(self, path: str | Sequence[str], resolution: int, augment: PairAugment,
                 batch_size: int = 64, val_batch_size: int | None = None, val_path: str | Sequence[str] | None = None,
                 holdout_fraction: float = 0.02, thresholds: Mapping[str, float | None] | None = None,
                 num_workers: int = 4, shuffle_buffer: int = 1000, seed: int = 0):
        super().__init__()
        self.path, self.val_path, self.resolution, self.augment = path, val_path, resolution, augment
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.holdout_fraction, self.num_workers, self.shuffle_buffer, self.seed = (
            holdout_fraction, num_workers, shuffle_buffer, seed)
        self.thresholds = dict(thresholds) if thresholds is not None else None

    def setup(self, stage: str | None = None) -> None:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        self.device_batch_size = per_device(self.batch_size, world_size, "batch_size")
        self.device_val_batch_size = per_device(self.val_batch_size, world_size, "val_batch_size")
        urls = shard_urls(self.path)
        if self.thresholds is None:
            self.thresholds = recorded_thresholds(self.path)
        if not self.thresholds:
            log.info("no score thresholds: every pair is used")
        # validate on the held-out share of `path`, unless `val_path` names other shards
        held_out = None if self.val_path else True
        self.train_set = PairStream(urls, self.thresholds, self.augment, train=True, seed=self.seed,
                                    shuffle_buffer=self.shuffle_buffer, holdout=None if self.val_path else False,
                                    holdout_fraction=self.holdout_fraction, batch_size=self.device_batch_size)
        resize = PairAugment(self.resolution, crop_scale=(1.0, 1.0), flip=False)  # no randomness left
        self.val_set = PairStream(shard_urls(self.val_path) if self.val_path else urls, self.thresholds,
                                  resize, train=False, holdout=held_out,
                                  holdout_fraction=self.holdout_fraction)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, self.device_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.device_val_batch_size)

    def loader(self, stream: PairStream, batch_size: int) -> DataLoader:
        if self.trainer is not None:
            stream.rank, stream.world_size = self.trainer.global_rank, self.trainer.world_size
            # steps are batches (one optimizer step each), so this is where the last run stopped
            stream.start_batch = self.trainer.global_step
        # a worker without shards would end early and break the round-robin order resuming relies on
        workers = min(self.num_workers, len(stream.urls))
        return DataLoader(stream, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available())
