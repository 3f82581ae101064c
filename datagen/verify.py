"""Check a generation run against its manifest: `python generate.py ... verify=true` or `python -m datagen.verify DIR`.

Every shard the manifest records must be present, match its checksum, open as a tar, hold exactly the
recorded keys in order, each with input.png, edited.png and json (images that decode, json naming its
key), and account with its rejects for every sample index of the shard. Shards not finished yet are
reported, not counted as damage: a rerun makes them.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from datagen.shards import ShardRecord, read_jsonl, sha256_file

MEMBERS = ("edited.png", "input.png", "json")


@dataclass
class VerifyReport:
    run_dir: Path
    shards_ok: int = 0
    pairs_ok: int = 0
    shards_total: int = 0
    problems: list[str] = field(default_factory=list)  # damage: delete the shard named and rerun to redo it
    notes: list[str] = field(default_factory=list)  # unfinished work, not damage

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        head = (f"{self.run_dir}: {self.shards_ok} of {self.shards_total} shards verified ({self.pairs_ok} pairs), "
                f"{len(self.problems)} problem(s)")
        return "\n".join([head, *(f"  problem: {p}" for p in self.problems), *(f"  note: {n}" for n in self.notes)])


def shard_problems(path: Path, record: ShardRecord, expected: range) -> list[str]:
    """What is wrong with one recorded shard (empty: nothing)."""
    name = record.shard
    problems = []
    if sha256_file(path) != record.sha256:
        problems.append(f"{name}: checksum differs from the manifest (damaged or replaced)")
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                members[key][ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        return problems + [f"{name}: does not open as a tar ({type(error).__name__}: {error})"]
    if list(members) != record.keys or len(members) != record.count:
        problems.append(f"{name}: holds {len(members)} samples, the manifest records {record.count} "
                        f"({len(set(record.keys) - set(members))} recorded keys missing)")
    for key, files in members.items():
        if tuple(sorted(files)) != MEMBERS:
            problems.append(f"{name}: sample {key} has {', '.join(sorted(files))}, expected {', '.join(MEMBERS)}")
            continue
        try:
            for image in ("input.png", "edited.png"):
                Image.open(io.BytesIO(files[image])).verify()
            if json.loads(files["json"])["key"] != key:
                problems.append(f"{name}: sample {key}'s json names another key")
        except Exception as error:  # PIL and json raise many types for damaged bytes; all mean the same here
            problems.append(f"{name}: sample {key} does not decode ({type(error).__name__}: {error})")
    accounted = sorted([int(key) for key in record.keys] + [row["index"] for row in record.rejects])
    if accounted != list(expected):
        problems.append(f"{name}: its pairs and rejects cover {len(accounted)} sample indices, "
                        f"expected {expected.start}..{expected.stop - 1}")
    return problems


def verify_run(run_dir: Path) -> VerifyReport:
    report = VerifyReport(run_dir)
    if not (run_dir / "config.yaml").is_file():
        report.problems.append(f"no config.yaml: {run_dir} is not a generation run")
        return report
    cfg = OmegaConf.load(run_dir / "config.yaml")
    report.shards_total = -(-cfg.num_pairs // cfg.shard_size)
    records = {}
    for row in read_jsonl(run_dir / "manifest.jsonl"):  # the last record of an index wins, as for a rerun
        record = ShardRecord(**row)
        records[record.index] = record
    shard_dir = run_dir / "shards"
    present = 0
    for index, record in sorted(records.items()):
        path = shard_dir / record.shard
        if not path.is_file():
            report.notes.append(f"{record.shard}: recorded but absent; a rerun makes it again")
            continue
        present += 1
        expected = range(index * cfg.shard_size, min((index + 1) * cfg.shard_size, cfg.num_pairs))
        problems = shard_problems(path, record, expected)
        report.problems += problems
        if not problems:
            report.shards_ok += 1
            report.pairs_ok += record.count
    recorded = {record.shard for record in records.values()}
    unrecorded = sorted(p.name for p in shard_dir.glob("*.tar") if p.name not in recorded) if shard_dir.is_dir() else []
    if unrecorded:
        report.notes.append(f"{len(unrecorded)} shard file(s) not in the manifest (killed before recording: "
                            f"a rerun makes them again): {', '.join(unrecorded[:5])}")
    unfinished = report.shards_total - present
    if unfinished > 0:
        report.notes.append(f"{unfinished} shard(s) not finished yet: rerun the same command to make them")
    if report.problems:
        report.notes.append("to redo a damaged shard, delete its file and rerun the same command")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen.verify", description="Check a generation run's shards.")
    parser.add_argument("run_dir", type=Path, help="a generation output directory (holds config.yaml, manifest.jsonl)")
    report = verify_run(parser.parse_args(argv).run_dir)
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
