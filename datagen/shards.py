"""Pair shards: written under a temporary name and renamed when complete, then recorded in the manifest.

A shard file under its final name is always whole; the manifest (`manifest.jsonl`, one line per finished
shard) is the record a rerun consults to skip work. Tar members carry a fixed mtime so that the same
samples give the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
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


class ShardWriter:
    """One shard of pairs; `close()` makes it visible (atomic rename) and appends it to the manifest."""

    def __init__(self, out_dir: Path, index: int) -> None:
        self.out_dir, self.index = Path(out_dir), index
        self.path = self.out_dir / "shards" / SHARD_PATTERN.format(index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # left by a killed run; only we own this index
            stale.unlink(missing_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.stream = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.stream, mtime=0.0)
        self.keys: list[str] = []

    def write(self, key: str, input_image: torch.Tensor, edited_image: torch.Tensor, meta: dict) -> None:
        self.tar.write({"__key__": key, "input.png": png_bytes(input_image), "edited.png": png_bytes(edited_image),
                        "json": json.dumps(meta, sort_keys=True).encode()})
        self.keys.append(key)

    def close(self) -> ShardRecord:
        self.tar.close()  # also closes the stream
        os.replace(self.tmp, self.path)
        record = ShardRecord(self.path.name, self.index, len(self.keys), self.keys, sha256_file(self.path))
        append_jsonl(self.out_dir / "manifest.jsonl", asdict(record))
        return record


def append_jsonl(path: Path, row: dict) -> None:
    """One write() of one line with O_APPEND: concurrent workers' lines never interleave."""
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
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
