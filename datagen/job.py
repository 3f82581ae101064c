"""A generation job: `num_pairs` samples, cut into shards, edited in batches, written as pair shards.

Sample i belongs to shard i // shard_size; worker r of n owns shards r, r+n, ... A rerun skips the shards
the manifest records, so a killed job resumes where it stopped and never writes a shard twice.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from datagen.backbone import load_backbone
from datagen.directions import bank_path, edit_direction
from datagen.editor import EditBatch, Editor
from datagen.shards import ShardWriter, append_jsonl, finished_shards
from datagen.sources import InputRejected, Sample
from filters.score import build_scorer

log = logging.getLogger("pairforge.generate")

# Settings that decide what a pair is: an out_dir made with other values is refused, not mixed into.
IDENTITY_KEYS = ("task", "model", "editor", "source", "seed", "shard_size", "num_pairs")


class ConfigError(ValueError):
    """A problem with the command line or config, reported before any model loads."""


@dataclass
class JobStats:
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    shards_written: int = 0
    shards_skipped: int = 0
    edit_seconds: float = 0.0
    unet_evals_per_pair: int = 0
    peak_gpu_memory_gb: float = 0.0

    def reject(self, reason: str) -> None:
        kind = reason.split(":")[-2].strip() if reason.count(":") >= 2 else reason.split(":")[0]
        self.rejected[kind] = self.rejected.get(kind, 0) + 1


def check_config(cfg: DictConfig) -> int:
    """Validate what can be checked without models; return the job's sample count."""
    if cfg.num_pairs is not None and cfg.num_pairs <= 0:
        raise ConfigError(f"num_pairs must be positive, got {cfg.num_pairs}")
    if cfg.shard_size <= 0 or cfg.batch_size <= 0:
        raise ConfigError("shard_size and batch_size must be positive")
    if not 0 <= cfg.worker.rank < cfg.worker.count:
        raise ConfigError(f"worker.rank {cfg.worker.rank} is not in [0, worker.count={cfg.worker.count})")
    if not cfg.task.get("direction"):
        for bank in (cfg.task.source_bank, cfg.task.target_bank):
            bank_path(bank)
    return cfg.num_pairs


def claim_out_dir(cfg: DictConfig, out_dir: Path) -> None:
    """Write config.yaml, or check that the existing one describes the same job."""
    identity = {key: OmegaConf.to_container(cfg, resolve=True)[key] for key in IDENTITY_KEYS}
    saved = out_dir / "config.yaml"
    if saved.is_file():
        previous = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
        changed = sorted(k for k in IDENTITY_KEYS if previous.get(k) != identity[k])
        if changed:
            raise ConfigError(f"{out_dir} holds a job made with other settings ({', '.join(changed)} differ); "
                              "use another out_dir, or delete it to start over")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))))
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


def edit_shard(cfg: DictConfig, editor: Editor, source, captioner, scorer, out_dir: Path, shard: int, total: int,
               stats: JobStats) -> None:
    writer = ShardWriter(out_dir, shard)
    indices = range(shard * cfg.shard_size, min((shard + 1) * cfg.shard_size, total))
    for start in range(0, len(indices), cfg.batch_size):
        samples = []
        for index in indices[start : start + cfg.batch_size]:
            try:
                samples.append(source[index])
            except InputRejected as error:
                append_jsonl(out_dir / "rejects.jsonl", {"index": index, "reason": str(error)})
                stats.reject(str(error))
        if not samples:
            continue
        real = samples[0].image is not None
        images = torch.stack([s.image for s in samples]) if real else None
        missing = [i for i, s in enumerate(samples) if s.prompt is None]
        if missing:
            for i, caption in zip(missing, captioner()(images[missing])):
                samples[i].prompt = caption
        result = editor.edit(EditBatch([s.seed for s in samples], [s.prompt for s in samples], images))
        stats.edit_seconds += result.seconds
        stats.unet_evals_per_pair = result.unet_evals
        scores = scorer(result.inputs.to(editor.backbone.device), result.edited) if scorer is not None else None
        for i, sample in enumerate(samples):
            if not result.finite[i]:
                reason = f"sample {sample.index}: non-finite latents"
                append_jsonl(out_dir / "rejects.jsonl", {"index": sample.index, "reason": reason})
                stats.reject(reason)
                continue
            meta = sample_meta(cfg, sample, "caption" if real else "prompt", result.seconds / len(samples), result.unet_evals)
            meta["xa_loss"] = round(float(result.xa_loss[i]), 6)
            if scores is not None:
                meta["scores"] = scores[i]
            writer.write(meta["key"], result.inputs[i], result.edited[i], meta)
            stats.written += 1
    writer.close()
    stats.shards_written += 1


def run(cfg: DictConfig) -> JobStats:
    total = check_config(cfg)
    out_dir = Path(cfg.out_dir)
    claim_out_dir(cfg, out_dir)
    num_shards = -(-total // cfg.shard_size)
    done = finished_shards(out_dir)
    mine = [s for s in range(cfg.worker.rank, num_shards, cfg.worker.count) if s not in done]
    stats = JobStats(shards_skipped=len(range(cfg.worker.rank, num_shards, cfg.worker.count)) - len(mine))
    if not mine:
        log.info("all %d shards of this worker are finished in %s", stats.shards_skipped, out_dir)
        return stats
    backbone = load_backbone(cfg.model, cfg.device)
    direction = edit_direction(backbone, cfg.task, cfg.cache_dir)
    # Partial first: instantiate would turn the Backbone dataclass into a config node.
    editor = instantiate(cfg.editor, _partial_=True)(backbone=backbone, direction=direction, resolution=cfg.model.resolution)
    source = instantiate(cfg.source)
    # Scorers run in fp32 whatever the editor's precision: a CLIP gain of 0.10 rests on similarity gaps of ~0.01.
    scorer = build_scorer(cfg.model.scorers, cfg.task, backbone.device) if cfg.filters.enabled else None
    captioner_cache = []

    def captioner():  # loaded on first need: synthetic and captioned inputs never load BLIP
        if not captioner_cache:
            captioner_cache.append(instantiate(cfg.model.captioner, device=cfg.device))
        return captioner_cache[0]

    started = time.perf_counter()
    for shard in mine:
        edit_shard(cfg, editor, source, captioner, scorer, out_dir, shard, total, stats)
        log.info("shard %d done: %d pairs so far, %.1f s", shard, stats.written, time.perf_counter() - started)
    if torch.cuda.is_available():
        stats.peak_gpu_memory_gb = torch.cuda.max_memory_allocated() / 2**30
    (out_dir / f"stats-{cfg.worker.rank:03d}.json").write_text(json.dumps(asdict(stats), indent=2))
    return stats
