"""python benchmark.py [benchmark/editors=toy] [source.n=64] [out=DIR]: every editor entry edits the same inputs, and
one report compares them (OUT/report.md, report.json, pairs.jsonl, pictures). The toy world (default) has ground
truth; benchmark/source=pie_bench source.path=DATA runs PIE-Bench. benchmark/preset=smoke: seconds, for a first try."""
import logging
import sys

import hydra
from omegaconf import DictConfig

import datagen.config  # noqa: F401  (registers the ${repo:...} resolver)
from datagen.runtime import ModelUnavailableError
from distill.losses import MissingWeightsError
from evaluation.editor_benchmark import BenchmarkError, run
from evaluation.pie_bench import PieBenchError


@hydra.main(config_path="conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        report = run(cfg)
    except (BenchmarkError, PieBenchError, MissingWeightsError, ModelUnavailableError) as error:
        logging.getLogger("pairforge.benchmark").error("%s", error)
        sys.exit(2)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
