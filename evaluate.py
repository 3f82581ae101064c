"""python evaluate.py data.path=DIR [student=generator.ts] out=REPORT_DIR: the paper's metrics for a run's pairs
and, side by side, for an exported student on the same inputs (REPORT_DIR/<task>/report.md, .json, cases/)."""
import logging
import sys

import hydra
import transformers
from omegaconf import DictConfig

import datagen.config  # noqa: F401  (registers the ${repo:...} resolver)
from datagen.runtime import ModelUnavailableError
from distill.data import PairDataError
from distill.losses import MissingWeightsError
from evaluation.evaluator import EvaluationError
from evaluation.job import run


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    transformers.utils.logging.set_verbosity_error()
    try:
        run(cfg)
    except (EvaluationError, PairDataError, MissingWeightsError, ModelUnavailableError) as error:
        logging.getLogger("pairforge.evaluate").error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
