"""python -m filters DIR [thresholds.seg_iou=0.5 ...] [device=auto|cpu|cuda] [dtype=auto|fp32|fp16|bf16] [batch_size=16]

Scores the pairs of generation run DIR that lack scores (with the scorers of the run's model preset),
writes the pairs passing the task's thresholds to DIR/filtered/, and reports in DIR/filter_report.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datagen.runtime import resolve_device, resolve_dtype
from datagen.shards import finished_shards
from filters.apply import filter_run
from filters.loading import MissingModelError
from filters.report import count_filters, write_report
from filters.score import build_scorer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m filters", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path, help="a generation output directory (holds config.yaml and shards/)")
    parser.add_argument("overrides", nargs="*", help="thresholds.NAME=MIN (null = off), device=..., dtype=..., batch_size=...")
    args = parser.parse_args(argv)

    config_path = args.run_dir / "config.yaml"
    if not config_path.exists():
        parser.error(f"{config_path} not found: DIR must be a generation run's output directory")
    if not finished_shards(args.run_dir):
        parser.error(f"{args.run_dir} has no finished shards yet (none recorded in its manifest.jsonl)")
    run = OmegaConf.load(config_path)
    options = OmegaConf.create({"thresholds": run.task.thresholds, "device": "auto", "dtype": "auto", "batch_size": 16})
    OmegaConf.set_struct(options, True)
    OmegaConf.set_struct(options.thresholds, False)  # any score may be thresholded, not only the task's
    try:
        options = OmegaConf.merge(options, OmegaConf.from_dotlist(args.overrides))
    except OmegaConfBaseException as error:
        parser.error(f"bad override: {error}")
    thresholds = OmegaConf.to_container(options.thresholds)
    device = resolve_device(options.device)

    def make_scorer():
        return build_scorer(run.model.scorers, run.task, device, resolve_dtype(options.dtype, device))

    try:
        verdicts = filter_run(args.run_dir, thresholds, make_scorer, options.batch_size)
    except MissingModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = write_report(args.run_dir, verdicts, thresholds)
    kept = sum(v.kept for v in verdicts)
    per_filter = ", ".join(f"{c.name} {c.passed}/{len(verdicts)}" for c in count_filters(verdicts, thresholds))
    print(f"kept {kept} of {len(verdicts)} pairs ({per_filter}) -> {args.run_dir / 'filtered'}; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
