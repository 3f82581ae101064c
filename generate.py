"""python generate.py task=cat2dog [model=tiny] num_pairs=8 out_dir=DIR: pix2pix-zero pairs as webdataset shards."""
import logging
import sys

import diffusers
import hydra
import transformers
from omegaconf import DictConfig

import datagen.config  # noqa: F401  (registers the ${repo:...} resolver)
from datagen.backbone import ModelUnavailableError
from datagen.directions import BankError
from datagen.job import ConfigError, run


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        stats = run(cfg)
    except (ConfigError, BankError, ModelUnavailableError) as error:
        logging.getLogger("pairforge.generate").error("%s", error)
        sys.exit(2)
    print(f"wrote {stats.written} pairs in {stats.shards_written} shards to {cfg.out_dir} "
          f"({stats.shards_skipped} shards already done, {sum(stats.rejected.values())} rejected)")


if __name__ == "__main__":
    main()
