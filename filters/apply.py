"""Filtering a finished generation run: score the pairs that lack scores, keep those that pass, copy them.

Reads the finished shards of run DIR (those its manifest records) and makes `DIR/filtered/` a run
directory of its own: `shards/pairs-NNNNNN.tar` with the kept samples of each shard (bytes unchanged,
json completed with its scores), `manifest.jsonl` in the generation format, and `config.yaml` with the
thresholds applied; anything that reads a run reads it. Scores computed here are cached in
`DIR/scores/pairs-NNNNNN.jsonl`, so trying other thresholds never scores twice; the generated shards
themselves are never modified (their manifest checksums stay true).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import webdataset as wds
from omegaconf import OmegaConf
from torchvision.io import ImageReadMode, decode_png

from datagen.shards import ShardRecord, finished_shards, sha256_file
from filters.score import PairScorer
from filters.thresholds import judge

Scores = dict[str, float | str]


@dataclass
class Judged:
    """One pair's verdict: its scores, whether it was kept, and why not."""

    key: str
    shard: str
    scores: Scores
    kept: bool
    reasons: list[str]


def read_samples(shard: Path) -> Iterator[dict[str, bytes | str]]:
    """Raw samples of one shard in order: `__key__` and each member's bytes."""
    for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
        yield {name: value for name, value in sample.items() if name == "__key__" or not name.startswith("__")}


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a hidden temporary beside `path`, then rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def image_tensor(png: bytes) -> torch.Tensor:
    return decode_png(torch.frombuffer(bytearray(png), dtype=torch.uint8), mode=ImageReadMode.RGB).float() / 255


def computed_scores(run_dir: Path, shard: Path, make_scorer: Callable[[], PairScorer], batch_size: int) -> dict[str, Scores]:
    """Scores of the shard's samples whose json has none, from the cache or scored now (and cached)."""
    cache = run_dir / "scores" / f"{shard.stem}.jsonl"
    if cache.exists():
        return {row["key"]: row["scores"] for row in map(json.loads, cache.read_text().splitlines())}
    unscored = (sample for sample in read_samples(shard) if "scores" not in json.loads(sample["json"]))
    keys: list[str] = []
    scores: list[Scores] = []
    while batch := list(itertools.islice(unscored, batch_size)):
        inputs = torch.stack([image_tensor(sample["input.png"]) for sample in batch])
        edited = torch.stack([image_tensor(sample["edited.png"]) for sample in batch])
        keys += [sample["__key__"] for sample in batch]
        scores += make_scorer()(inputs, edited)
    if not keys:
        return {}
    cache.parent.mkdir(exist_ok=True)
    lines = "".join(json.dumps({"key": key, "scores": row}) + "\n" for key, row in zip(keys, scores))
    write_atomic(cache, lambda path: path.write_text(lines))
    return dict(zip(keys, scores))


def filter_run(
    run_dir: Path, thresholds: Mapping[str, float | None], make_scorer: Callable[[], PairScorer], batch_size: int = 16
) -> list[Judged]:
    """Judge every finished pair of the run and write the kept ones to DIR/filtered/; returns all verdicts.

    `make_scorer` is called (once) only if some pair lacks scores, so filtering a scored run loads no model.
    """
    make_scorer = functools.cache(make_scorer)
    out_dir = run_dir / "filtered"
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    verdicts: list[Judged] = []
    records: list[ShardRecord] = []
    for index, record in sorted(finished_shards(run_dir).items()):
        shard = run_dir / "shards" / record.shard
        missing = computed_scores(run_dir, shard, make_scorer, batch_size)
        kept_keys: list[str] = []

        def write_kept(path: Path) -> None:
            with open(path, "wb") as stream, wds.TarWriter(stream, mtime=0.0) as sink:
                for sample in read_samples(shard):
                    meta = json.loads(sample["json"])
                    scores = meta.get("scores", missing.get(sample["__key__"], {}))
                    kept, reasons = judge(scores, thresholds)
                    verdicts.append(Judged(sample["__key__"], shard.name, scores, kept, reasons))
                    if kept:
                        sink.write({**sample, "json": json.dumps({**meta, "scores": scores}, sort_keys=True).encode()})
                        kept_keys.append(sample["__key__"])

        target = out_dir / "shards" / shard.name
        write_atomic(target, write_kept)
        records.append(ShardRecord(shard.name, index, len(kept_keys), kept_keys, sha256_file(target)))

    config = OmegaConf.load(run_dir / "config.yaml")
    config.task.thresholds = dict(thresholds)
    write_atomic(out_dir / "config.yaml", lambda path: OmegaConf.save(config, path))
    lines = "".join(json.dumps(asdict(record), sort_keys=True) + "\n" for record in records)
    write_atomic(out_dir / "manifest.jsonl", lambda path: path.write_text(lines))
    return verdicts
