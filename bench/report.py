"""Result tables: printed as Markdown (pasted as is into BENCHMARKS.md) and written as JSON with the
machine, versions, date and the command that made them."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


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


def write_report(name: str, out: Path | None, device: torch.device, tables: dict[str, tuple[list[dict], list[str]]],
                 notes: Sequence[str] = ()) -> Path:
    """Write `{environment, notes, tables}` to JSON, then print the notes and the tables (last, as promised)."""
    path = Path(out) if out is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    payload = {"environment": env, "notes": list(notes),
               "tables": {title: {"columns": list(columns), "rows": rows} for title, (rows, columns) in tables.items()}}
    path.write_text(json.dumps(payload, indent=1))
    print(f"\n{env['device']} | torch {env['torch']} | {env['date']}\n`{env['command']}`  -> {path}")
    for note in notes:
        print(note)
    for title, (rows, columns) in tables.items():
        print(f"\n{title}\n\n{markdown_table(rows, columns)}")
    return path
