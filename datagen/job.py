"""A generation job: `num_pairs` samples, cut into shards, edited in batches, written as pair shards.

Sample i belongs to shard i // shard_size; worker r of n owns shards r, r+n, ... A rerun skips the shards
the manifest records, so a killed job resumes where it stopped and never writes a shard twice. Everything
about the job's progress (pairs, rejects, costs) is read back from the manifest, whichever workers, runs
and machines made its shards.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub.utils
import torch
import transformers
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from datagen.backbone import load_backbone
from datagen.directions import bank_path, edit_direction
from datagen.editors import build_editor
from datagen.editors.base import EditBatch, Editor
from datagen.prompts import PromptEdit, PromptNotEditable
from datagen.shards import ShardWriter, finished_shards
from datagen.sources import InputRejected, Sample, SourceError
from filters.score import build_scorer

log = logging.getLogger("pairforge.generate")

# Settings that decide what a pair is: an out_dir made with other values is refused, not mixed into.
IDENTITY_KEYS = ("task", "model", "editor", "source", "seed", "shard_size", "num_pairs")


class ConfigError(ValueError):
    """A problem with the command line or config, reported before any model loads."""


@dataclass
class Job:
    """What to make: the source and the sample count, checked without loading a model."""

    cfg: DictConfig
    source: Any  # maps a sample index to a Sample (datagen.sources)
    total: int

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.cfg.shard_size)

    def shard_indices(self, shard: int) -> range:
        return range(shard * self.cfg.shard_size, min((shard + 1) * self.cfg.shard_size, self.total))

    def shards_of(self, rank: int, count: int) -> range:
        return range(rank, self.num_shards, count)


def plan_job(cfg: DictConfig) -> Job:
    """Validate what can be checked without models and build the source; `num_pairs: null` = the whole source."""
    if cfg.num_pairs is not None and cfg.num_pairs <= 0:
        raise ConfigError(f"num_pairs must be positive, got {cfg.num_pairs}")
    if cfg.shard_size <= 0 or cfg.batch_size <= 0:
        raise ConfigError(f"shard_size and batch_size must be positive, got {cfg.shard_size} and {cfg.batch_size}")
    if not cfg.task.get("direction"):
        for bank in (cfg.task.source_bank, cfg.task.target_bank):
            bank_path(bank)
    missing = OmegaConf.missing_keys(cfg.source)
    if missing:
        raise ConfigError(f"the source needs {', '.join(f'{key}=...' for key in sorted(missing))}")
    try:
        source = instantiate(cfg.source)
    except InstantiationException as error:  # hydra wraps what the source's constructor raised
        if isinstance(error.__cause__, SourceError):
            raise ConfigError(str(error.__cause__)) from None
        raise
    size = len(source) if isinstance(source, Sized) else None
    if cfg.num_pairs is None and size is None:
        raise ConfigError("this source has no fixed size: set num_pairs=N (the paper makes 15000 pairs per task)")
    if cfg.num_pairs is not None and size is not None and cfg.num_pairs > size:
        raise ConfigError(f"num_pairs={cfg.num_pairs} but the source holds {size} inputs (num_pairs=null takes them all)")
    return Job(cfg, source, cfg.num_pairs or size)


def claim_out_dir(job: Job, out_dir: Path) -> None:
    """Write config.yaml (with num_pairs resolved), or check that the existing one describes the same job."""
    cfg = OmegaConf.to_container(job.cfg, resolve=True)
    cfg["num_pairs"] = job.total
    saved = out_dir / "config.yaml"
    if saved.is_file():
        previous = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
        changed = sorted(key for key in IDENTITY_KEYS if previous.get(key) != cfg[key])
        if changed:
            raise ConfigError(f"{out_dir} holds a job made with other settings ({', '.join(changed)} differ); "
                              "use another out_dir, or delete it to start over")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")  # workers starting together each write their own
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    tmp.replace(saved)


def sample_meta(cfg: DictConfig, sample: Sample, kind: str, seconds: float, unet_evals: int) -> dict:
    editor = OmegaConf.to_container(cfg.editor, resolve=True)
    editor.pop("_target_", None)
    return {
        "key": f"{sample.index:09d}", "index": sample.index, "task": cfg.task.name,
        "source_word": cfg.task.source_word, "target_word": cfg.task.target_word,
        kind: sample.prompt, "seed": sample.seed, "model": cfg.model.path or cfg.model.id or cfg.model.name,
        "editor": editor, "timings": {"seconds": round(seconds, 4), "unet_evals": unet_evals}, **sample.meta,
    }


def hide_loading_bars() -> None:
    """No per-component "Loading weights" bars from transformers or diffusers: the worker's own bar and log lines
    say what the run is doing. The hub's download bars, which transformers switches off with its own, stay as
    they were: a first download takes minutes and its bar is all that shows it is under way."""
    downloads_shown = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    if downloads_shown:
        huggingface_hub.utils.enable_progress_bars()


class Worker:
    """One worker's models, loaded once, and the loop over its shards."""

    def __init__(self, job: Job, out_dir: Path) -> None:
        hide_loading_bars()  # here, in the process that loads the models: launch may run a worker in its own
        cfg = self.cfg = job.cfg
        self.job, self.out_dir = job, out_dir
        backbone = load_backbone(cfg.model, cfg.device)
        self.editor: Editor = build_editor(cfg.editor, backbone, cfg.model.resolution,
                                           lambda: edit_direction(backbone, cfg.task, cfg.cache_dir), cfg.compile,
                                           cfg.cache_dir)
        self.prompt_edit = PromptEdit.from_task(cfg.task) if self.editor.uses_target_prompts else None
        # Scorers run in fp32 whatever the editor's precision: a CLIP gain of 0.10 rests on similarity gaps of ~0.01.
        self.scorer = build_scorer(cfg.model.scorers, cfg.task, backbone.device) if cfg.filters.enabled else None
        self.device = backbone.device
        self.png_encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="png")  # batch n's PNGs during batch n+1
        self._captioner = None

    def caption(self, images: torch.Tensor) -> list[str]:
        if self._captioner is None:  # loaded on first need: synthetic and captioned inputs never load BLIP
            self._captioner = instantiate(self.cfg.model.captioner, device=self.cfg.device)
        return self._captioner(images)

    def make_shard(self, shard: int, progress: tqdm) -> dict:
        writer = ShardWriter(self.out_dir, shard, self.png_encoder)
        indices = self.job.shard_indices(shard)
        unet_evals = 0
        for start in range(0, len(indices), self.cfg.batch_size):
            batch = indices[start : start + self.cfg.batch_size]
            samples = []
            for index in batch:
                try:
                    samples.append(self.job.source[index])
                except InputRejected as error:
                    writer.reject(index, error.reason, error.detail)
            if samples:
                unet_evals = self.edit_batch(samples, writer) or unet_evals  # 0: the whole batch was rejected
            progress.update(len(batch))
            progress.set_postfix(rejected=len(writer.rejects), refresh=False)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        return asdict(writer.close(unet_evals, peak))

    def edit_batch(self, samples: list[Sample], writer: ShardWriter) -> int:
        real = samples[0].image is not None
        images = torch.stack([s.image for s in samples]) if real else None
        uncaptioned = [i for i, s in enumerate(samples) if s.prompt is None]
        if uncaptioned:
            for i, caption in zip(uncaptioned, self.caption(images[uncaptioned])):
                samples[i].prompt = caption
        targets = None
        if self.prompt_edit is not None:  # an input whose prompt the task's rule cannot edit is rejected, not passed on
            editable, targets = [], []
            for i, sample in enumerate(samples):
                try:
                    targets.append(self.prompt_edit.target(sample.prompt))
                    editable.append(i)
                except PromptNotEditable as error:
                    writer.reject(sample.index, error.reason, error.detail)
            if not editable:
                return 0
            samples = [samples[i] for i in editable]
            images = images[editable] if real else None
        result = self.editor.edit(EditBatch([s.seed for s in samples], [s.prompt for s in samples], images, targets))
        scores = self.scorer(result.inputs.to(self.device), result.edited) if self.scorer is not None else None
        for i, sample in enumerate(samples):
            if not result.finite[i]:  # one diverged sample is rejected, not its batch
                writer.reject(sample.index, "non-finite latents", sample.meta.get("source", ""))
                continue
            kind = "caption" if real else "prompt"
            meta = sample_meta(self.cfg, sample, kind, result.seconds / len(samples), result.unet_evals)
            if targets is not None:
                meta["target_prompt"] = targets[i]
            if result.xa_loss is not None:
                meta["xa_loss"] = round(float(result.xa_loss[i]), 6)
            if result.records:
                meta.update(result.records[i])
            if scores is not None:
                meta["scores"] = scores[i]
            writer.write(meta["key"], result.inputs[i], result.edited[i], meta)
        return result.unet_evals


def run(cfg: DictConfig, position: int = 0) -> list[dict]:
    """Make worker `cfg.worker.rank` of `cfg.worker.count`'s unfinished shards; returns their manifest records.
    `position` places this worker's progress bar among those of the same machine."""
    job = plan_job(cfg)
    rank, count = cfg.worker.rank, cfg.worker.count
    if not (isinstance(rank, int) and isinstance(count, int) and 0 <= rank < count):
        raise ConfigError(f"worker.rank must be in [0, worker.count), got rank={rank}, count={count}")
    out_dir = Path(cfg.out_dir)
    claim_out_dir(job, out_dir)
    done = finished_shards(out_dir)
    mine = [shard for shard in job.shards_of(rank, count) if shard not in done]
    if not mine:
        log.info("worker %d/%d: all its shards are finished in %s", rank, count, out_dir)
        return []
    worker = Worker(job, out_dir)
    records = []
    total, done_samples, started = sum(len(job.shard_indices(shard)) for shard in mine), 0, time.perf_counter()
    # disable=None: no bar where stderr is not a terminal (cluster logs); the per-shard log line says the same there.
    with tqdm(total=total, desc=f"worker {rank}/{count}", unit="pair", position=position, dynamic_ncols=True,
              disable=None) as progress:
        for shard in mine:
            records.append(worker.make_shard(shard, progress))
            done_samples += len(job.shard_indices(shard))
            rate = done_samples / (time.perf_counter() - started)
            log.info("worker %d/%d: shard %d done (%d/%d shards, %.2f pairs/s, ETA %.0f s)",
                     rank, count, shard, len(records), len(mine), rate, (total - done_samples) / rate)
    return records


@dataclass
class Summary:
    """The job as its manifest records it, whichever workers and runs made the shards."""

    shards_done: int
    shards_total: int
    pairs_total: int
    written: int
    rejected: dict[str, int]
    seconds_per_pair: float
    unet_evals_per_pair: int
    peak_gpu_memory_gb: float

    def table(self) -> str:
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items()))
        rows = [
            ("shards finished", f"{self.shards_done} / {self.shards_total}"),
            ("pairs written", f"{self.written} of {self.pairs_total} samples"),
            ("rejected", f"{rejected}" + (f" ({reasons})" if reasons else "")),
            ("seconds per pair", f"{self.seconds_per_pair:.3f} (one worker's wall time)"),
            ("UNet evals per pair", str(self.unet_evals_per_pair)),
        ]
        if self.peak_gpu_memory_gb > 0:  # 0: every shard was made on a CPU, where nothing measured it
            rows.append(("peak GPU memory", f"{self.peak_gpu_memory_gb:.2f} GiB"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def summarize(out_dir: Path) -> Summary:
    """Read the job's numbers from its config and manifest; also written to `out_dir/stats.json`."""
    cfg = OmegaConf.load(out_dir / "config.yaml")
    records = finished_shards(out_dir).values()
    written = sum(r.count for r in records)
    summary = Summary(
        shards_done=len(records), shards_total=-(-cfg.num_pairs // cfg.shard_size), pairs_total=cfg.num_pairs,
        written=written, rejected=dict(Counter(row["reason"] for r in records for row in r.rejects)),
        seconds_per_pair=round(sum(r.seconds for r in records) / max(written, 1), 4),
        unet_evals_per_pair=max((r.unet_evals for r in records), default=0),
        peak_gpu_memory_gb=max((r.peak_gpu_memory_gb for r in records), default=0.0),
    )
    tmp = out_dir / f".stats.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(summary), indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / "stats.json")
    return summary
