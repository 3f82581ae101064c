"""Distillation runs end to end on tiny shards (CPU, small generator, random-trunk LPIPS): learning,
exact resume, loggers, checkpoints an export can read, and the stop on a non-finite loss."""
import csv
import itertools
import urllib.error
from pathlib import Path

import lpips.pretrained_networks
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from test_distill_data import validation_stream, write_pair_shards

from distill.data import shard_urls
from distill.losses import (MissingWeightsError, build_lpips, discriminator_adversarial, generator_adversarial,
                            r1_penalty)
from distill.module import DistillModule, NonFiniteLossError, frozen
from distill.training import train

CONF = Path(__file__).resolve().parents[1] / "conf"
RESOLUTION = 64  # the small generator's
NO_AUGMENTATION = ["data.augment.crop_scale=[1,1]", "data.augment.flip=false", "data.augment.brightness=0",
                   "data.augment.contrast=0", "data.augment.saturation=0", "data.augment.hue=0",
                   "data.augment.noise_std=0"]


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on two shared cores run several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(data_dir: Path, out_dir: Path, *overrides: str, experiment: str | None = "smoke"):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        chosen = [f"experiment={experiment}"] if experiment else []
        return compose("train", overrides=[*chosen, f"data.path={data_dir}", f"out_dir={out_dir}", *overrides])


def validation_l1(metrics_csv: Path) -> list[tuple[int, float]]:
    with open(metrics_csv) as f:
        return [(int(row["step"]), float(row["val/l1"])) for row in csv.DictReader(f) if row["val/l1"]]


def test_small_generator_overfits_eight_pairs_and_logs(tmp_path):
    pairs = write_pair_shards(tmp_path / "gen", count=8, resolution=RESOLUTION)  # target: inverted colours
    run = tmp_path / "run"
    steps = 40
    cfg = run_config(pairs, run, f"data.val_path={pairs}", "data.thresholds={}", "data.batch_size=8", *NO_AUGMENTATION,
                     "distill.lpips_weight=0", "distill.adversarial_weight=0", "distill.ema_half_life=16",
                     f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps // 2}",
                     f"callbacks.periodic.every_n_train_steps={steps // 2}", "logger=[csv,wandb]")
    train(cfg)

    curve = validation_l1(run / "csv" / "metrics.csv")
    print("validation L1 (step, value):", curve)
    (first_step, first), (_, last) = curve[0], curve[-1]
    assert first_step == 0 and len(curve) == 3
    assert last <= 0.5 * first

    # the loggers and the run directory
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run / "config.yaml").is_file() and OmegaConf.load(run / "config.yaml").data.path == str(pairs)
    grids = sorted((run / "samples").glob("step-*.png"))
    assert len(grids) == 3
    # one row per pair: input | teacher | student
    assert Image.open(grids[-1]).size == (3 * RESOLUTION + 4 * 2, 8 * RESOLUTION + 9 * 2)
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt", "best.ckpt", f"step-{steps // 2:07d}.ckpt"}

    # an export rebuilds the EMA generator from the checkpoint alone, and gets the last validation's L1
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    generator = instantiate(checkpoint["hyper_parameters"]["generator"]).eval()
    generator.load_state_dict({k.removeprefix("G_ema."): v for k, v in checkpoint["state_dict"].items()
                               if k.startswith("G_ema.")})
    errors = []
    for sample in validation_stream(shard_urls(str(pairs)), {}, RESOLUTION):
        with torch.no_grad():
            output = generator(sample["input"][None])[0]
        errors.append((output - sample["target"]).abs().mean())
    assert torch.stack(errors).mean().item() == pytest.approx(last, abs=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_resume_continues_exactly_and_a_nan_loss_stops_the_run(tmp_path, channels_last):
    pairs = write_pair_shards(tmp_path / "gen", count=8, per_shard=3, resolution=RESOLUTION)
    # everything on: augmentation, LPIPS, adversarial loss with R1 every other step, dropout, EMA
    common = ["data.batch_size=2", "distill.r1_interval=2", "distill.ema_half_life=8", "logger=[]",
              f"distill.channels_last={channels_last}"]
    train(run_config(pairs, tmp_path / "unbroken", *common, "trainer.max_steps=5"))
    train(run_config(pairs, tmp_path / "resumed", *common, "trainer.max_steps=3"))
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    train(run_config(pairs, tmp_path / "resumed", *common, "trainer.max_steps=5", f"resume={last}"))

    unbroken = torch.load(tmp_path / "unbroken" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == unbroken["global_step"] == 5
    assert unbroken["state_dict"].keys() == resumed["state_dict"].keys()
    assert any(k.startswith("D.") for k in resumed["state_dict"])
    for name, tensor in unbroken["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(resumed["optimizer_states"], unbroken["optimizer_states"], rtol=0, atol=0)

    # infinite input noise makes the losses NaN at the first step after resuming: the run stops, names
    # the step and the checkpoint to go back to, and writes no checkpoint with NaN weights
    with pytest.raises(NonFiniteLossError, match=rf"step 5 .*Last good checkpoint: {last}"):
        train(run_config(pairs, tmp_path / "resumed", *common, "trainer.max_steps=7", f"resume={last}",
                         "data.augment.noise_std=inf"))
    after = torch.load(last, weights_only=True)
    assert after["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in after["state_dict"].values() if t.is_floating_point())


def test_missing_vgg_weights_name_the_file_and_the_offline_option(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16", no_network)
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af\.pth.*distill\.lpips_pretrained_vgg=false"):
        build_lpips(pretrained=True)


@pytest.mark.parametrize("preset", ["gpu", "cpu", "ddp", "slurm"])
def test_trainer_presets_build(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    cfg = run_config(tmp_path, tmp_path, f"trainer={preset}", experiment=None)
    assert cfg.trainer.precision == ("32-true" if preset == "cpu" else "bf16-mixed")
    if preset == "slurm":
        assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 3)
        return  # Lightning needs the rest of a real SLURM job's environment
    trainer = instantiate(cfg.trainer, accelerator="cpu", devices=1, precision="32-true", logger=False)
    assert trainer.max_steps == 100_000
    assert type(trainer.strategy).__name__ == ("DDPStrategy" if preset == "ddp" else "SingleDeviceStrategy")


def test_two_backward_passes_give_the_gradients_of_one(tmp_path):
    """G's pass then D's (+ R1) leave exactly the gradients of one backward through the summed losses."""
    cfg = run_config(tmp_path, tmp_path, "distill.r1_interval=4")
    module = instantiate(cfg.distill)
    module.manual_backward = lambda loss: loss.backward()   # Lightning's hook, without a trainer
    hp = module.hparams
    image, target = torch.rand(2, 2, 3, RESOLUTION, RESOLUTION).mul(2).sub(1)

    def gradients(step) -> dict[str, torch.Tensor]:
        module.zero_grad(set_to_none=True)
        torch.manual_seed(0)   # G's z and dropout
        step()
        return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}

    def two_passes():
        output, _ = module.generator_phase(image, target)
        module.discriminator_phase(image, target, output.detach())

    def one_pass():
        output = module.G(image)
        with frozen(module.D):
            g_adv = generator_adversarial(module.D(image, output))
        d_adv = discriminator_adversarial(module.D(image, target), module.D(image, output.detach()))
        total = (F.l1_loss(output, target) + hp.lpips_weight * module.lpips(output, target).mean()
                 + hp.adversarial_weight * g_adv + d_adv
                 + hp.r1_gamma / 2 * hp.r1_interval * r1_penalty(module.D, image, target))
        total.backward()

    phased, joint = gradients(two_passes), gradients(one_pass)
    assert phased.keys() == joint.keys()
    assert any(n.startswith("G.") for n in joint) and any(n.startswith("D.") for n in joint)
    for name, grad in joint.items():
        torch.testing.assert_close(phased[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_channels_last_gives_the_gradients_of_contiguous(tmp_path):
    image, target = torch.rand(2, 2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)).mul(2).sub(1)
    gradients = {}
    for channels_last in (False, True):
        torch.manual_seed(0)   # the same initial weights
        module = instantiate(run_config(tmp_path, tmp_path, f"distill.channels_last={channels_last}").distill)
        module.manual_backward = lambda loss: loss.backward()
        batch = module.on_after_batch_transfer({"input": image, "target": target, "key": ["a", "b"]}, 0)
        assert batch["input"].is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.manual_seed(1)   # G's z and dropout
        output, _ = module.generator_phase(batch["input"], batch["target"])
        module.discriminator_phase(batch["input"], batch["target"], output.detach())
        gradients[channels_last] = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    assert module.G.encoder.blocks[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert gradients[True].keys() == gradients[False].keys()
    # NHWC sums in another order. A gradient that is a sum of cancelling terms (a noise strength, a bias) keeps
    # its terms' rounding, not a share of its own small size, so the bound scales with its network's gradients:
    # up to 5e-4 of it where oneDNN picks AVX-512 kernels for NHWC; a layout bug is off by the gradients' own size
    for name, grad in gradients[False].items():
        scale = max(g.abs().max() for other, g in gradients[False].items() if other[:2] == name[:2])  # "G." or "D."
        torch.testing.assert_close(gradients[True][name], grad, rtol=0, atol=2e-3 * scale, msg=name)


def test_g_and_d_step_at_the_configured_lr_and_betas(tmp_path):
    """R1 is part of D's one Adam step per batch, so D takes no extra steps and needs none of StyleGAN2's lazy-R1
    scaling of its lr and betas (r1_interval / (r1_interval + 1): 0.94 x lr and beta2 0.9906 at 16)."""
    module = instantiate(run_config(tmp_path, tmp_path).distill)
    optimizer = module.configure_optimizers()
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in module.parameters() if p.requires_grad} and module.D is not None
    assert [(group["lr"], group["betas"]) for group in optimizer.param_groups] == [(1e-3, (0.0, 0.99))] * 2


def test_the_adversarial_weight_has_one_default_the_configs(tmp_path):
    cfg = run_config(tmp_path, tmp_path)
    assert cfg.distill.adversarial_weight == 0.05 and instantiate(cfg.distill).D is not None
    with pytest.raises(TypeError, match="adversarial_weight"):
        DistillModule(generator=cfg.distill.generator, lpips_pretrained_vgg=False)
    with pytest.raises(ValueError, match="adversarial_weight=0.05 needs a discriminator"):
        DistillModule(generator=cfg.distill.generator, adversarial_weight=0.05, lpips_pretrained_vgg=False)


@pytest.mark.parametrize("preset, resolution", [("comodgan_512", 512), ("toy", 32)])
def test_the_discriminator_follows_the_generator_preset(tmp_path, preset, resolution):
    cfg = run_config(tmp_path, tmp_path, f"generator@distill.generator={preset}", experiment=None)
    generator, discriminator = cfg.distill.generator, cfg.distill.discriminator
    assert (discriminator.resolution, discriminator.channel_base, discriminator.channel_max) == (
        resolution, generator.channel_base, generator.channel_max)
    with torch.device("meta"):  # the full-size networks' shapes, without allocating or computing 108 M weights
        G, D = instantiate(generator).eval(), instantiate(discriminator)
        image = torch.empty(2, 3, resolution, resolution)
        assert D(image, G(image)).shape == (2, 1)


class Scale(pl.LightningModule):
    """The smallest module a Trainer can step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Endless(torch.utils.data.IterableDataset):
    """A stream without end, as the pairs are: one epoch holds the whole run."""

    def __iter__(self):
        return itertools.repeat(torch.ones(1))


def test_the_progress_bar_counts_steps_of_max_steps_from_where_a_run_resumes(tmp_path, capsys):
    bar_config = run_config(tmp_path, tmp_path).callbacks.progress

    def fit(max_steps: int, ckpt_path: Path | None = None):
        bar = instantiate(bar_config)
        trainer = pl.Trainer(max_steps=max_steps, callbacks=[bar], accelerator="cpu", logger=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.fit(Scale(), torch.utils.data.DataLoader(Endless(), batch_size=2), ckpt_path=ckpt_path)
        return trainer, bar.train_progress_bar, capsys.readouterr().out.split("\r")[-1]

    trainer, bar, line = fit(4)
    print(line)
    assert (bar.n, bar.total) == (4, 4) and "Training: 100%" in line and "4/4 [" in line and "step/s" in line
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    _, bar, line = fit(10, tmp_path / "step4.ckpt")
    assert (bar.initial, bar.n, bar.total) == (4, 10, 10) and "10/10 [" in line
