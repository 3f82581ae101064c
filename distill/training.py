"""A distillation run from its composed config (`conf/train.yaml`): what `python train.py ...` does."""
from __future__ import annotations

import logging
import netrc
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

import datagen.config  # noqa: F401  (registers the ${repo:...} resolver the configs use)

log = logging.getLogger(__name__)

# LPIPS stays in eval mode on purpose, and checkpoints are meant to hold the weights after the step
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def train(cfg: DictConfig) -> pl.Trainer:
    """Fit the student on the pairs of `cfg.data`; the final state is `out_dir/checkpoints/last.ckpt`."""
    out_dir = Path(cfg.out_dir)
    save_config(cfg, out_dir / "config.yaml")
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.distill)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(lg) for lg in cfg.get("logger", {}).values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.ckpt_path is None:
        trainer.validate(module, datamodule=datamodule)  # the starting point, logged at step 0
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    # periodic checkpoints need not fall on the last step
    trainer.save_checkpoint(out_dir / "checkpoints" / "last.ckpt", weights_only=False)  # with optimizer and loops
    return trainer


@rank_zero_only
def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def wandb_logger(**kwargs) -> WandbLogger:
    """WandbLogger that logs offline (with one notice) when no API key is configured, instead of prompting."""
    offline = kwargs.pop("offline", False) or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    if not offline and not wandb_api_key_configured():
        offline = True
        rank_zero_only(log.warning)("wandb: no API key (WANDB_API_KEY or `wandb login`), logging offline to %s; "
                                    "upload later with `wandb sync`", Path(kwargs.get("save_dir", ".")) / "wandb")
    return WandbLogger(offline=offline, **kwargs)


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class StepProgressBar(TQDMProgressBar):
    """Lightning's bars, with the training bar counting optimizer steps of `max_steps` (rate and ETA included).

    The pair stream never ends, so the whole run is epoch 0 and Lightning's bar, which counts an epoch's
    batches, has no total to show. A resumed run's bar starts at its step; the rate counts this run's steps.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, *_) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.n = bar.initial = trainer.global_step
        bar.unit = "step"
        bar.set_description("Training")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if self.is_enabled and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
