"""Validation against ground truth: at every validation, the EMA generator edits a toy task's held-out renders and is
scored beside its teacher (`evaluation.student_truth`), so the logs show how much of the teacher's quality it keeps."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from evaluation.student_truth import METRICS, StudentTruth


class GroundTruthValidation(pl.Callback):
    """Logs truth/{correct,psnr,lpips} (the student's means against the true edits), truth/teacher_* (its teacher's,
    constant) and truth/ratio (student / teacher correct-edit rate) at each validation of `run_dir`'s student.

    `run_dir` is the generation run (its config.yaml names the task, model and editor); the teacher's edits of the
    `n` renders are made on first use and cached there (minutes of a CPU, once per run)."""

    def __init__(self, run_dir: str | Path, n: int = 64, seed: int = 0, batch_size: int = 64,
                 cache_dir: str | Path | None = "~/.cache/pairforge"):
        self.run_dir, self.n, self.seed, self.batch_size, self.cache_dir = Path(run_dir), n, seed, batch_size, cache_dir
        self.truth: StudentTruth | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.truth is None:
            self.truth = StudentTruth.from_run(self.run_dir, self.n, self.seed, str(pl_module.device), self.batch_size,
                                               self.cache_dir)
            self.truth.lpips.to(pl_module.device)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = self.truth.score(pl_module.G_ema, pl_module.device)
        values = {f"truth/{name}": score.student[name] for name in METRICS}
        values |= {f"truth/teacher_{name}": score.teacher[name] for name in METRICS}
        values["truth/ratio"] = score.ratio["correct"]
        pl_module.log_dict(values, batch_size=score.pairs)
