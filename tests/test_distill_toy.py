"""The toy world's distillation recipe in seconds: the adversarial and perceptual terms on, losses that fall, the
offline perceptual trunk frozen, and the ground-truth validation the callback logs (the teacher's edits cached)."""
import csv
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_distill_data import write_pair_shards
from test_distill_train import NO_AUGMENTATION, run_config
from test_student_truth import toy_run

from distill.module import DistillModule
from distill.perceptual import ClipVisionLpips
from distill.training import train
from evaluation.student_truth import StudentTruth

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the trunk must load without a hub
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_clip() -> ClipVisionLpips:
    return instantiate(OmegaConf.load(CONF / "perceptual" / "toy_clip.yaml"))  # as train.py builds it


def test_the_toy_clip_trunk_loads_offline_frozen_and_is_a_distance():
    perceptual = toy_clip().train()  # a module put in training mode stays a fixed metric
    assert not perceptual.training and not perceptual.tower.training
    assert not any(p.requires_grad for p in perceptual.parameters())
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1 for _ in range(2))
    x.requires_grad_(True)
    distance = perceptual(x, y)
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    assert perceptual(y, y).abs().max() < 1e-6
    distance.sum().backward()
    assert x.grad.abs().sum() > 0  # a loss for the generator, with no gradient into the trunk


def test_a_short_toy_distillation_with_adversarial_and_perceptual_terms_lowers_its_losses(tmp_path):
    run_dir = toy_run(tmp_path / "gen", count=16)
    steps = 30
    cfg = run_config(run_dir, tmp_path / "run", "data.thresholds={}", "data.batch_size=8", "data.num_workers=0",
                     "data.holdout_fraction=0.25", *NO_AUGMENTATION, "distill.adversarial_weight=0.1", "distill.r1_interval=4",
                     f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.log_every_n_steps=1",
                     "callbacks.ground_truth.n=8", experiment="toy")
    trainer = train(cfg)

    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    curve = {name: [float(row[f"train/{name}"]) for row in rows if row.get(f"train/{name}")]
             for name in ("l1", "lpips", "g_adv", "d_adv", "r1")}
    print({name: (values[:3], values[-3:]) for name, values in curve.items()})
    assert all(len(values) >= steps // 4 for values in curve.values())  # every term ran (R1 every 4th step)
    for name in ("l1", "lpips"):
        first, last = curve[name][:5], curve[name][-5:]
        assert sum(last) < 0.7 * sum(first), name
    module: DistillModule = trainer.lightning_module
    assert isinstance(module.perceptual, ClipVisionLpips) and module.D is not None
    assert not any(p.requires_grad for p in module.perceptual.parameters())
    reference = toy_clip()
    assert all(torch.equal(a, b) for a, b in zip(module.perceptual.state_dict().values(), reference.state_dict().values()))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith(("perceptual.", "lpips.")) for key in checkpoint["state_dict"])

    # the ground-truth validation: logged at step 0 and at the end, the last equal to the final G_ema's score
    truth = [row for row in rows if row.get("truth/ratio")]
    assert len(truth) == 2 and int(truth[0]["step"]) == 0
    score = StudentTruth.from_run(run_dir, n=8).score(module.G_ema.eval())
    assert float(truth[-1]["truth/correct"]) == pytest.approx(score.student["correct"])
    assert float(truth[-1]["truth/psnr"]) == pytest.approx(score.student["psnr"], rel=1e-4)
    assert float(truth[-1]["truth/teacher_correct"]) == 1.0  # the cached teacher is the truth itself
    assert float(truth[-1]["truth/ratio"]) == pytest.approx(score.student["correct"])


def test_the_lr_ramps_down_to_zero_over_the_last_share_of_the_steps(tmp_path):
    pairs = write_pair_shards(tmp_path / "gen", count=8, resolution=64)
    run = tmp_path / "run"
    train(run_config(pairs, run, "data.batch_size=4", "distill.lr_rampdown=0.5", "distill.lr=0.002", "logger=[]"))
    lrs = {path.stem: [group["lr"] for group in torch.load(path, weights_only=True)["optimizer_states"][0]["param_groups"]]
           for path in (run / "checkpoints").glob("*.ckpt")}
    # smoke: 8 steps, a checkpoint every 4; constant for the first 4, then a cosine: 0.5 x lr after 6, 0 after 8
    assert lrs["step-0000004"] == [0.002, 0.002]  # G's and D's groups
    assert lrs["last"] == pytest.approx([0.0, 0.0], abs=1e-12)
