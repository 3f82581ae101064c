"""python train.py distill=comodgan data.path=DIR out_dir=RUN: distill generated pairs into a Co-Mod-GAN translator.

`experiment=smoke` trains a small generator on the CPU for a few steps; `resume=PATH` (or `ckpt_path=`)
continues a run exactly. The last checkpoint is always RUN/checkpoints/last.ckpt.
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from distill.data import PairDataError
from distill.losses import MissingWeightsError
from distill.module import NonFiniteLossError
from distill.training import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (PairDataError, MissingWeightsError, NonFiniteLossError) as error:
        logging.getLogger("pairforge.train").error("%s", error)
        sys.exit(2)
    print(f"done: {cfg.out_dir}/checkpoints/last.ckpt")


if __name__ == "__main__":
    main()
