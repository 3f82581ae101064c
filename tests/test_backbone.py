from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import datagen.config  # noqa: F401  (the ${repo:} resolver)
from datagen.backbone import load_backbone, tiny_backbone
from datagen.runtime import ModelUnavailableError, resolve_dtype

CONF = str(Path(__file__).resolve().parent.parent / "conf")
TASKS = sorted(p.stem for p in (Path(CONF) / "task").glob("*.yaml"))


def generate_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


@pytest.mark.parametrize("model", ["sd14", "sd15", "sd21", "tiny", "toy"])
def test_model_presets_compose(model):
    cfg = generate_cfg(f"model={model}")
    assert cfg.model.name == model and cfg.model.resolution in (32, 64, 512)
    assert "_target_" in cfg.model.scorers.clip and "_target_" in cfg.model.captioner


def test_paper_defaults():
    cfg = generate_cfg()
    assert cfg.model.id == "CompVis/stable-diffusion-v1-4"
    e = cfg.editor
    assert (e.num_inference_steps, e.guidance_scale, e.xa_guidance_real, e.xa_guidance_synthetic) == (50, 5.0, 0.1, 0.15)
    assert (e.regularizer.lambda_ac, e.regularizer.lambda_kl, e.regularizer.num_reg_steps, e.regularizer.num_ac_rolls) == (20, 20, 5, 5)
    paper = generate_cfg("editor=paper").editor
    assert (paper.num_inference_steps, paper.num_inversion_steps) == (100, 100)


@pytest.mark.parametrize("task", TASKS)
def test_task_configs_compose(task):
    cfg = generate_cfg(f"task={task}")
    assert cfg.task.name == task and cfg.out_dir == f"out/{task}"


def test_missing_weights_give_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = generate_cfg("model=sd14", "model.id=nobody/no-such-model")
    with pytest.raises(ModelUnavailableError) as error:
        load_backbone(cfg.model, "cpu")
    message = str(error.value)
    assert "nobody/no-such-model" in message and "model.path=" in message and "model=toy" in message and "model=tiny" in message
    assert "\n" not in message
    cfg = generate_cfg("model=sd14", "model.path=/no/such/folder")
    with pytest.raises(ModelUnavailableError, match="/no/such/folder"):
        load_backbone(cfg.model, "cpu")


def test_precision_policy():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


def test_casting_the_backbone_says_nothing(caplog):
    """diffusers logs a warning at every model cast (its list of fp32 modules is empty); a run's start stays quiet,
    and diffusers' own verbosity is left as it was."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    tiny_backbone(0).to(torch.device("cpu"), torch.bfloat16)
    assert "float32" not in caplog.text
    assert diffusers_logging.get_verbosity() == verbosity
    tiny_backbone(0).unet.to(torch.bfloat16)  # control: the bare cast is what warns
    assert "should be kept in float32" in caplog.text
