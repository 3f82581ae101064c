"""The student metric against ground truth: hand-computed values on tiny images, the identity and the true edit as
students, the teacher's cached edits, and evaluate.py's report of it."""
import json
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_distill_data import png

import evaluation.student_truth as student_truth
from evaluation.compose import generate_config, task_config
from evaluation.ground_truth import BenchmarkSet, toy_set
from evaluation.job import run as evaluate
from evaluation.student_truth import StudentTruth, teacher_digest, truth_lpips, truth_metrics

CONF = Path(__file__).resolve().parents[1] / "conf"


class MeanAbsolute(torch.nn.Module):
    """A stand-in LPIPS whose value is easy to compute by hand: the mean absolute difference, B x 1 x 1 x 1."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to read

    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(1).view(-1, 1, 1, 1)


def tiny_set() -> BenchmarkSet:
    """Two 2 x 2 'scenes': black inputs; truth is a white top-left pixel (pair 0) and a white bottom-right (pair 1); the
    rule's candidates are the input (0), the truth (1) and an all-white image (2)."""
    images = torch.zeros(2, 3, 2, 2)
    truth = torch.zeros(2, 3, 2, 2)
    truth[0, :, 0, 0] = 1
    truth[1, :, 1, 1] = 1
    alternatives = torch.stack([images, truth, torch.ones(2, 3, 2, 2)], dim=1)
    return BenchmarkSet(name="tiny", keys=["a", "b"], images=images, prompts=["", ""], target_prompts=["", ""],
                        seeds=[0, 1], edit_masks=truth[:, 0] > 0, words=[None, None], truth=truth,
                        alternatives=alternatives, truth_index=1)


def test_metrics_equal_hand_computed_values_on_tiny_images():
    bset = tiny_set()
    edited = torch.zeros(2, 3, 2, 2)
    edited[0, :, 0, 0] = 0.6  # per channel 0.4^2 to the truth, 0.6^2 to the input: correct; MSE 0.16 / 4 = 0.04
    edited[1] = 0.3           # per channel 4 x 0.09 to the input, 3 x 0.09 + 0.7^2 to the truth: wrong; MSE 0.76 / 4
    values = truth_metrics(edited, bset, MeanAbsolute())
    assert values["correct"].tolist() == [1.0, 0.0]
    assert values["psnr"][0].item() == pytest.approx(10 * math.log10(1 / 0.04))
    assert values["psnr"][1].item() == pytest.approx(10 * math.log10(1 / ((3 * 0.09 + 0.49) / 4)))
    # LPIPS sees [-1, 1] images: twice the [0, 1] differences
    assert values["lpips"].tolist() == pytest.approx([2 * 0.4 / 4, 2 * (3 * 0.3 + 0.7) / 4])


def test_the_score_is_the_means_and_the_ratio_is_student_over_teacher():
    bset = tiny_set()
    teacher = bset.truth.clone()
    teacher[1] = 0  # the input for pair 1: wrong
    truth = StudentTruth(bset, teacher, lpips=MeanAbsolute())
    score = truth.score(lambda images: bset.truth * 2 - 1)  # a student that draws the true edits, in [-1, 1]
    assert score.student["correct"] == 1.0 and score.teacher["correct"] == 0.5
    assert score.ratio["correct"] == 2.0
    assert score.student["psnr"] == math.inf and score.student["lpips"] == 0.0  # it drew both true edits exactly
    assert score.teacher["psnr"] == pytest.approx(10 * math.log10(4))  # pair 1: one pixel of four off by 1; pair 0 inf
    assert "| correct-edit rate ↑ | 1.000 | 0.500 | 2.000 |" in score.table()


@pytest.fixture(scope="module")
def renders() -> BenchmarkSet:
    return toy_set(OmegaConf.to_container(task_config("circle2square")), n=6, seed=0, size=32)


@pytest.fixture(scope="module")
def lpips():
    return truth_lpips()


def test_an_identity_student_scores_what_the_input_scores_and_the_truth_scores_perfectly(renders, lpips):
    truth = StudentTruth(renders, renders.truth, lpips=lpips)
    identity = truth.score(lambda images: images)
    inputs = truth.score_edits(renders.images)
    assert identity.student == pytest.approx(inputs.student, rel=1e-6)
    assert identity.student["correct"] == 0.0  # the input is one of the rule's candidates, never the true edit
    assert math.isfinite(identity.student["psnr"]) and identity.student["lpips"] > 0
    perfect = truth.score_edits(renders.truth)
    assert perfect.student == {"correct": 1.0, "psnr": math.inf, "lpips": 0.0}
    assert perfect.teacher == perfect.student and perfect.ratio["correct"] == 1.0
    # a student at another resolution sees the renders at its own and is resized back
    upsampled = truth.score(lambda images: torch.nn.functional.interpolate(images, scale_factor=2.0, mode="nearest"))
    assert upsampled.student["correct"] == 0.0
    assert upsampled.student["psnr"] == pytest.approx(identity.student["psnr"], abs=0.5)


def test_the_teacher_edits_once_and_later_runs_read_its_cache(tmp_path, monkeypatch, lpips):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = generate_config(["task=circle2square", "model=toy", "editor.num_inference_steps=2",
                           "editor.num_inversion_steps=2", "editor.regularizer=null"])
    OmegaConf.save(run, run_dir / "config.yaml")
    monkeypatch.setattr(student_truth, "truth_lpips", lambda: lpips)
    first = StudentTruth.from_run(run_dir, n=2, device="cpu", cache_dir=tmp_path / "cache")
    [cached] = (run_dir / "ground_truth").glob("teacher-*.pt")
    assert first.teacher["correct"].shape == (2,) and torch.isfinite(first.teacher["lpips"]).all()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(student_truth, "teacher_edits", no_teacher)
    again = StudentTruth.from_run(run_dir, n=2, device="cpu", cache_dir=tmp_path / "cache")
    assert all(torch.equal(first.teacher[name], again.teacher[name]) for name in first.teacher)
    # another editor setting is another teacher: the cache does not answer for it
    OmegaConf.save(OmegaConf.merge(run, {"editor": {"guidance_scale": 3.0}}), run_dir / "config.yaml")
    with pytest.raises(AssertionError, match="the teacher ran again"):
        StudentTruth.from_run(run_dir, n=2, device="cpu", cache_dir=tmp_path / "cache")
    assert cached.is_file()


def toy_run(folder: Path, count: int) -> Path:
    """A circle2square run on the toy model whose pairs are rendered true edits (the teacher made perfect), and the
    teacher's edits of the ground-truth renders cached as the true edits: no diffusion runs."""
    run = generate_config(["task=circle2square", "model=toy"])
    pairs = toy_set(OmegaConf.to_container(run.task), count, seed=1, size=32)
    (folder / "shards").mkdir(parents=True)
    with wds.TarWriter(str(folder / "shards" / "pairs-000000.tar")) as writer:
        for i in range(count):
            to_png = lambda image: png((image.permute(1, 2, 0) * 255).round().byte().numpy())
            writer.write({"__key__": f"{i:09d}", "input.png": to_png(pairs.images[i]),
                          "edited.png": to_png(pairs.truth[i]), "json": b'{"scores": {}}'})
    OmegaConf.save(run, folder / "config.yaml")
    renders = toy_set(OmegaConf.to_container(run.task), 8, seed=0, size=32)
    (folder / "ground_truth").mkdir()
    torch.save(renders.truth, folder / "ground_truth" / f"teacher-{teacher_digest(run, 8, 0)}.pt")
    return folder


class IdentityStudent(torch.nn.Module):
    """An exported "student" that returns its input, with the resolution evaluate.py reads."""

    def __init__(self):
        super().__init__()
        self.resolution = 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def test_evaluate_reports_a_toy_student_against_ground_truth_beside_its_teacher(tmp_path, capsys, lpips, monkeypatch):
    run_dir = toy_run(tmp_path / "run", count=4)
    student = tmp_path / "identity.ts"
    torch.jit.script(IdentityStudent()).save(str(student))
    monkeypatch.setattr(student_truth, "truth_lpips", lambda: lpips)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"data.path={run_dir}", f"out={tmp_path / 'report'}", "device=cpu",
                                             f"student={student}", "data.thresholds={}", "ground_truth.n=8", "cases=1"])
    [report] = evaluate(cfg)
    written = json.loads((report.parent / "ground_truth.json").read_text())
    expected = StudentTruth.from_run(run_dir, n=8).score(lambda images: images)
    assert written["student"] == pytest.approx(expected.student) and written["student"]["correct"] == 0.0
    assert written["teacher"] == {"correct": 1.0, "psnr": math.inf, "lpips": 0.0}  # the cached teacher: the truth
    assert "circle2square: student / teacher correct-edit rate 0.00" in capsys.readouterr().out
