"""Pair shards: written under a temporary name and renamed when complete, then recorded in the manifest.

A shard file under its final name is always whole; the manifest (`manifest.jsonl`, one line per finished
shard) is the record a rerun consults to skip work. Tar members carry a fixed mtime so that the same
samples give the same bytes. PNG encoding (~50-100 ms per 512 px image on one core, with the GIL released)
can run on an executor's threads while the caller edits the next batch; samples still enter the tar in the
order they were written. A shard's rejected inputs are logged to `rejects.jsonl` when the shard
closes, just before its manifest line, so a shard redone after a kill does not log them twice (only a
kill between those two appends can; readers key rejects by index).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

SHARD_PATTERN = "pairs-{:06d}.tar"


def png_bytes(image: torch.Tensor) -> bytes:
    """3 x H x W in [0, 1] -> PNG bytes (deterministic: same pixels, same bytes)."""
    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_sample(key: str, input_image: torch.Tensor, edited_image: torch.Tensor, meta: dict) -> dict[str, object]:
    """One tar sample: both images as PNG, the metadata as sorted JSON."""
    return {"__key__": key, "input.png": png_bytes(input_image), "edited.png": png_bytes(edited_image),
            "json": json.dumps(meta, sort_keys=True).encode()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardRecord:
    shard: str
    index: int
    count: int
    keys: list[str]
    sha256: str
    rejects: list[dict] = field(default_factory=list)  # {index, reason, detail} of the shard's samples it lacks
    seconds: float = 0.0  # wall time one worker spent making the shard
    unet_evals: int = 0  # single-sample UNet forwards per pair
    peak_gpu_memory_gb: float = 0.0  # of the worker process, up to this shard


class ShardWriter:
    """One shard of pairs; `close()` makes it visible (atomic rename) and appends it to the manifest. With an
    `encoder` (a thread pool), `write` returns before its sample is encoded; at most `max_pending` samples wait."""

    def __init__(self, out_dir: Path, index: int, encoder: Executor | None = None, max_pending: int = 64) -> None:
        self.out_dir, self.index = Path(out_dir), index
        self.path = self.out_dir / "shards" / SHARD_PATTERN.format(index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # left by a killed run; only we own this index
            stale.unlink(missing_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.stream = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.stream, mtime=0.0)
        self.encoder, self.max_pending = encoder, max_pending
        self.pending: deque[Future] = deque()
        self.keys: list[str] = []
        self.rejects: list[dict] = []
        self.started = time.perf_counter()

    def write(self, key: str, input_image: torch.Tensor, edited_image: torch.Tensor, meta: dict) -> None:
        if self.encoder is None:
            self.tar.write(encode_sample(key, input_image, edited_image, meta))
        else:
            self.pending.append(self.encoder.submit(encode_sample, key, input_image, edited_image, meta))
            self._store_encoded(keep=self.max_pending)
        self.keys.append(key)

    def _store_encoded(self, keep: int) -> None:
        """Move encoded samples into the tar in write order: those done at the front, and (waiting for them)
        more while over `keep` are pending."""
        while self.pending and (len(self.pending) > keep or self.pending[0].done()):
            self.tar.write(self.pending.popleft().result())

    def reject(self, index: int, reason: str, detail: str = "") -> None:
        """A sample of this shard that will not be in it."""
        self.rejects.append({"index": index, "reason": reason, "detail": detail})

    def close(self, unet_evals: int = 0, peak_gpu_memory_gb: float = 0.0) -> ShardRecord:
        self._store_encoded(keep=0)
        self.tar.close()  # also closes the stream
        os.replace(self.tmp, self.path)
        record = ShardRecord(self.path.name, self.index, len(self.keys), self.keys, sha256_file(self.path), self.rejects,
                             round(time.perf_counter() - self.started, 3), unet_evals, round(peak_gpu_memory_gb, 3))
        append_jsonl(self.out_dir / "rejects.jsonl", *({"shard": self.index, **row} for row in self.rejects))
        append_jsonl(self.out_dir / "manifest.jsonl", asdict(record))
        return record


def append_jsonl(path: Path, *rows: dict) -> None:
    """One write() with O_APPEND: concurrent workers' lines never interleave."""
    if not rows:
        return
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: its shard is redone
            continue
    return rows


def finished_shards(out_dir: Path) -> dict[int, ShardRecord]:
    """Shards the manifest records whose file is present (the last record of an index wins)."""
    records = {}
    for row in read_jsonl(Path(out_dir) / "manifest.jsonl"):
        record = ShardRecord(**row)
        if (Path(out_dir) / "shards" / record.shard).is_file():
            records[record.index] = record
    return records
