"""Result tables: printed as Markdown (pasted as is into BENCHMARKS.md) and written as JSON with the
machine, versions, date and the command that made them."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def script_arguments(doc: str, name: str, smoke: str) -> argparse.ArgumentParser:
    """A bench script's command line, begun with the options every script has: --smoke, --threads, --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's; --smoke: 1)")
    parser.add_argument("--out", type=Path, help=f"JSON path (default bench/results/{name}.json; --smoke: a temporary folder)")
    return parser


def set_threads(args: argparse.Namespace) -> None:
    """--threads; a smoke run takes one: tiny kernels gain nothing from more threads and lose much on a busy machine."""
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)


def environment(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor())
        # the machine may be shared: the load says how many cores others were using meanwhile
        name = f"{name}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    packages = ("torch", "diffusers", "transformers", "pytorch-lightning")
    return {
        "device": name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench." + Path(sys.argv[0]).stem] + sys.argv[1:]),
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
        **{name: version(name) for name in packages},
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Result tables filled setting by setting. Each new row is printed at once and the JSON rewritten (marked
    partial), so a run cut off by a time limit (a lent GPU's call) keeps what it measured; `finish` writes the
    final JSON with the machine, versions, date and command, then prints the notes and every table, last.

    The JSON goes to `out`, else to bench/results/<name>.json, except for a `smoke` run's: its figures are no
    results, so without `out` it goes to a new temporary folder rather than among (or over) the committed ones."""

    def __init__(self, name: str, out: Path | None, device: torch.device, tables: dict[str, Sequence[str]],
                 notes: Sequence[str] = (), smoke: bool = False) -> None:
        if out is None:
            out = (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if smoke else RESULTS) / f"{name}.json"
        self.path = Path(out)
        self.device, self.notes = device, list(notes)
        self.tables: dict[str, tuple[list[str], list[dict]]] = {title: (list(columns), []) for title, columns in tables.items()}

    def rows(self, title: str) -> list[dict]:
        return self.tables[title][1]

    def add(self, title: str, *rows: dict) -> None:
        columns, table = self.tables[title]
        table.extend(rows)
        for row in rows:
            print(markdown_table([row], columns).splitlines()[-1], flush=True)
        self._write(partial=True)

    def _write(self, partial: bool) -> dict[str, str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        env = environment(self.device)
        payload = {"environment": env, "notes": self.notes, "partial": partial,
                   "tables": {title: {"columns": columns, "rows": rows} for title, (columns, rows) in self.tables.items()}}
        self.path.write_text(json.dumps(payload, indent=1))
        return env

    def finish(self) -> Path:
        env = self._write(partial=False)
        print(f"\n{env['device']} | torch {env['torch']} | {env['date']}\n`{env['command']}`  -> {self.path}")
        for note in self.notes:
            print(note)
        for title, (columns, rows) in self.tables.items():
            if rows:
                print(f"\n{title}\n\n{markdown_table(rows, columns)}")
        return self.path
