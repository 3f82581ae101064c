"""`python evaluate.py`'s work, callable with a composed config: every run of `data.path` evaluated and reported; a
student of a toy-world task is also scored against ground truth beside its teacher (evaluation/student_truth.py)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from datagen.runtime import resolve_device
from evaluation.evaluator import EvaluationError, RunEvaluator
from evaluation.ground_truth import TASK_EDITS
from evaluation.report import markdown_table, summarise, write_report
from evaluation.student_truth import StudentTruth, write_truth_report


def run(cfg: DictConfig) -> list[Path]:
    """Evaluate each generation run of `cfg.data.path` (one task each); returns the report.md paths."""
    run_dirs = list(cfg.data.path) if isinstance(cfg.data.path, ListConfig) else [cfg.data.path]
    thresholds = OmegaConf.to_container(cfg.data.thresholds) if cfg.data.thresholds is not None else None
    reports: dict[str, Path] = {}
    for run_dir in map(Path, run_dirs):
        evaluator = RunEvaluator(run_dir, cfg.metrics, resolve_device(cfg.device), cfg.student, thresholds,
                                 cfg.data.holdout, cfg.data.holdout_fraction, cfg.batch_size, cfg.ns_lpips)
        task = evaluator.run.task.name
        if task in reports:  # both would write REPORT_DIR/<task>/
            raise EvaluationError(f"{run_dir} and an earlier run of data.path are both task {task!r}: evaluate them separately")
        result = evaluator.evaluate()
        reports[task] = write_report(evaluator, result, Path(cfg.out), cfg.cases)
        print(f"{task}: {len(result.keys)} pairs of {run_dir} -> {reports[task]}")
        print("\n".join(markdown_table(summarise(result))))
        if evaluator.student is not None and task in TASK_EDITS:
            truth = StudentTruth.from_run(run_dir, cfg.ground_truth.n, cfg.ground_truth.seed, cfg.device, cfg.batch_size)
            score = truth.score(evaluator.student.translate, evaluator.student.device)
            print("\n".join(score.table()))
            print(f"{task}: student / teacher correct-edit rate {score.ratio['correct']:.2f} "
                  f"(-> {write_truth_report(score, reports[task].parent)})")
    return list(reports.values())
