"""Filtering a run's shards: exactly the expected keys kept, counts in the report, scoring what lacks scores."""
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from datagen.shards import finished_shards
from filters.__main__ import main
from filters.apply import filter_run, read_samples
from filters.report import FilterCounts, count_filters, write_report
from run_fixtures import write_run

NAN_REASON = "seg_iou: both masks empty: no 'cat' in the input, no 'dog' in the edited image"
# cat2dog keeps seg_iou >= 0.70 and clip_gain >= 0.10.
KNOWN_SCORES = [
    {"seg_iou": 0.9, "clip_gain": 0.2},  # kept
    {"seg_iou": 0.5, "clip_gain": 0.2},  # overlap too small
    {"seg_iou": 0.9, "clip_gain": 0.05},  # too little gain
    {"seg_iou": math.nan, "clip_gain": 0.3, "nan_reason": NAN_REASON},  # nothing segmented: never kept
    {"seg_iou": 0.3, "clip_gain": -0.1},  # fails both
    {"seg_iou": 0.7, "clip_gain": 0.1},  # exactly at both thresholds: kept
]


def no_scorer():
    raise AssertionError("every pair already has scores: no scorer model should be loaded")


def filtered_samples(run_dir: Path) -> dict[str, dict]:
    return {s["__key__"]: s for shard in sorted((run_dir / "filtered" / "shards").glob("*.tar")) for s in read_samples(shard)}


def test_filtering_known_scores_keeps_exactly_the_passing_keys_and_reports_the_counts(tmp_path):
    run_dir = tmp_path / "run"
    keys = write_run(run_dir, KNOWN_SCORES, in_progress=True)
    thresholds = {"seg_iou": 0.7, "clip_gain": 0.1, "clip_direction": None}
    verdicts = filter_run(run_dir, thresholds, no_scorer)

    assert [v.key for v in verdicts] == keys[:6]  # the unfinished shard is left alone
    kept = filtered_samples(run_dir)
    assert sorted(kept) == [keys[0], keys[5]]
    originals = {s["__key__"]: s for s in read_samples(run_dir / "shards" / "pairs-000001.tar")}
    assert kept[keys[5]]["edited.png"] == originals[keys[5]]["edited.png"]
    assert json.loads(kept[keys[5]]["json"])["scores"] == KNOWN_SCORES[5]
    assert [(r.shard, r.keys) for r in finished_shards(run_dir / "filtered").values()] == [
        ("pairs-000000.tar", [keys[0]]),
        ("pairs-000001.tar", [keys[5]]),
    ]
    assert OmegaConf.load(run_dir / "filtered" / "config.yaml").task.thresholds == thresholds
    assert verdicts[3].reasons == [f"seg_iou: nan ({NAN_REASON.split(': ', 1)[1]})"]

    assert count_filters(verdicts, thresholds) == [
        FilterCounts("seg_iou", 0.7, passed=3, failed=3, undefined=1, decisive=2),
        FilterCounts("clip_gain", 0.1, passed=4, failed=2, undefined=0, decisive=1),
    ]
    report = write_report(run_dir, verdicts, thresholds).read_text()
    assert "**2 of 6 pairs kept**" in report
    assert "| seg_iou | >= 0.7 | 3 | 3 | 1 | 2 |" in report
    assert "| clip_gain | >= 0.1 | 4 | 2 | 0 | 1 |" in report
    assert f"- 1 pairs: {NAN_REASON}" in report and "Thresholds off: clip_direction." in report
    for name in ("seg_iou", "clip_gain"):
        assert (run_dir / "filter_report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_overrides_thresholds_and_writes_the_report(tmp_path, capsys):
    run_dir = tmp_path / "run"
    keys = write_run(run_dir, KNOWN_SCORES, in_progress=True)
    assert main([str(run_dir), "thresholds.seg_iou=0.4", "thresholds.clip_gain=null"]) == 0

    assert sorted(filtered_samples(run_dir)) == [keys[0], keys[1], keys[2], keys[5]]
    assert "kept 4 of 6 pairs (seg_iou 4/6)" in capsys.readouterr().out
    assert "| seg_iou | >= 0.4 | 4 | 2 | 1 | 2 |" in (run_dir / "filter_report.md").read_text()
    with pytest.raises(SystemExit):
        main([str(run_dir), "treshold.seg_iou=0.4"])  # a typo is an error, not a silently ignored option


def test_cli_scores_pairs_without_scores_with_the_runs_scorers_once(tmp_path):
    run_dir = tmp_path / "run"
    keys = write_run(run_dir, scores=None, per_shard=2, in_progress=True)
    assert main([str(run_dir), "thresholds.seg_iou=null", "thresholds.clip_gain=-1", "batch_size=3"]) == 0

    kept = filtered_samples(run_dir)
    assert sorted(kept) == keys[:4]  # clip_gain >= -1 always holds
    scores = json.loads(kept[keys[0]]["json"])["scores"]
    assert {"seg_iou", "clip_gain", "clip_direction", "clip_image"} <= set(scores)
    cached = [json.loads(line) for line in (run_dir / "scores" / "pairs-000000.jsonl").read_text().splitlines()]
    assert [row["key"] for row in cached] == keys[:2]
    # A second pass with other thresholds reads the cache and loads no model.
    verdicts = filter_run(run_dir, {"clip_gain": 2.0}, no_scorer)
    assert [v.scores for v in verdicts[:2]] == [row["scores"] for row in cached] and not any(v.kept for v in verdicts)


def test_cli_reports_a_missing_scorer_model_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_run(run_dir, scores=None, in_progress=True)
    config = OmegaConf.load(run_dir / "config.yaml")
    config.model.scorers.clip = {"_target_": "filters.clip_gain.TransformersClipEncoder.from_pretrained", "name_or_path": "/no/such/clip"}
    OmegaConf.save(config, run_dir / "config.yaml")

    assert main([str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Scorer model '/no/such/clip' is not available") and "Traceback" not in error
