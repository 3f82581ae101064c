"""The editor benchmark: the toy world's ground truth (renderer check, prompts, the correct-edit rule), its metrics on
hand-computed cases, editor entries composed as generate.py composes them, and the smoke preset's report (its
structure, its reference rows, and that fixed seeds give the same report)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from datagen.editors.base import EditBatch, Editor, EditResult
from evaluation.benchmark_report import at_threshold, best_f1, filter_summary, pr_curve, write_report
from evaluation.compose import generate_config, task_config
from evaluation.editor_benchmark import (BenchmarkError, EditorBenchmark, EditorEntry, SetMeasure, editor_entries, hydra_value,
                                         word_direction)
from evaluation.ground_truth import TASK_EDITS, correct_edits, held_out_inputs, nearest_alternative, region_psnr, toy_scenes, toy_set
from toyworld.models import WEIGHTS
from toyworld.render import render
from toyworld.world import COLOURS, SHAPES, captions, is_held_out

CONF = Path(__file__).resolve().parent.parent / "conf"
TASKS = tuple(TASK_EDITS)
needs_weights = pytest.mark.skipif(not (WEIGHTS / "unet").exists(), reason="toyworld/weights not trained yet")


@pytest.fixture(scope="module")
def sets():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return {name: toy_set(task_config(name), 12, 0, 32) for name in TASKS}


@pytest.mark.parametrize("task", TASKS)
def test_true_edit_differs_from_the_input_only_inside_the_union_of_the_object_masks(sets, task):
    bset = sets[task]
    changed = (bset.images - bset.truth).abs().amax(1) > 0  # B x H x W
    assert not (changed & ~bset.edit_masks).any()
    assert changed.flatten(1).any(1).all()  # and every true edit changes something: the check cannot pass vacuously


@pytest.mark.parametrize("task", TASKS)
def test_target_prompt_is_the_true_edits_caption(sets, task):
    bset = sets[task]
    assert bset.target_prompts == [meta["true_caption"] for meta in bset.meta]
    assert all(source != target for source, target in zip(bset.prompts, bset.target_prompts))


def test_inputs_are_held_out_scenes_that_have_the_tasks_source_attribute():
    rng = np.random.default_rng(5)
    for task, edit in TASK_EDITS.items():
        scenes = held_out_inputs(edit, 20, rng, 32)
        assert is_held_out(scenes).all() and edit.applies(scenes).all() and not edit.applies(edit.apply(scenes)).any(), task
    circles = held_out_inputs(TASK_EDITS["circle2circle_dot"], 20, rng, 32)
    assert all(text.count("circle") == 1 and "dot" not in text for text in captions(circles))


def test_the_first_inputs_do_not_depend_on_n():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        task = task_config("plain2striped")
    small, large = toy_set(task, 4, 0, 32), toy_set(task, 40, 0, 32)
    assert torch.equal(small.images, large.images[:4]) and small.prompts == large.prompts[:4]
    assert not torch.equal(toy_set(task, 4, 1, 32).images, small.images)  # the seed does change them


def changed(scenes, **values):
    """A copy of `scenes` with the first object's fields set (`outline`, the drawing style, is the scene's)."""
    copy = scenes[np.arange(len(scenes))]
    for name, value in values.items():
        field = getattr(copy, name)
        if field.ndim == 2:
            field[:, 0] = value
        else:
            field[:] = value
    return copy


@pytest.mark.parametrize("task", TASKS)
def test_correct_edit_rule(sets, task):
    """The truth is correct; the input, the task's edit plus another change to the object (its shape, its colour), the
    object removed or mostly removed are not; the background no candidate draws on does not decide; a diverged (NaN)
    edit is not correct."""
    bset = sets[task]
    _, truth_scenes = toy_scenes(task, len(bset), 0, 32)
    assert torch.equal(render(truth_scenes)[0], bset.truth)
    assert correct_edits(bset.truth, bset).all()
    assert not correct_edits(bset.images, bset).any()
    other_shape = (truth_scenes.shape[:, 0] + 2) % len(SHAPES)  # e.g. an outlined star filled but drawn as a circle;
    # circle2square: a star (a circle would be the input)
    other_colour = (truth_scenes.colour[:, 0] + 1) % len(COLOURS)
    removed = render(changed(truth_scenes, present=False))[0]
    kinds = bset.alternative_kinds
    assert kinds[0] == "true_edit" and kinds.count("input") == 1 and len(kinds) == bset.alternatives.shape[1]
    assert torch.equal(bset.alternatives[:, kinds.index("input")], bset.images)
    for kind, wrong in (("shape", changed(truth_scenes, shape=other_shape)), ("colour", changed(truth_scenes, colour=other_colour))):
        assert not correct_edits(render(wrong)[0], bset).any()
        assert {kinds[i] for i in nearest_alternative(render(wrong)[0], bset.alternatives).tolist()} == {kind}
    assert not correct_edits(removed, bset).any()
    assert not correct_edits(0.4 * bset.truth + 0.6 * removed, bset).any()  # more object deleted than drawn
    # the background where no candidate draws its object, inverted: it adds the same to every distance
    unused = ~(bset.alternatives != bset.truth[:, None]).any(1).any(1, keepdim=True)
    assert unused.float().mean() > 0.3  # most of the picture
    assert correct_edits(torch.where(unused, 1 - bset.truth, bset.truth), bset).all()
    diverged = bset.truth.clone()
    diverged[0, 0, 0, 0] = torch.nan
    assert nearest_alternative(diverged, bset.alternatives)[0] == -1 and not correct_edits(diverged, bset)[0]


def test_region_psnr_on_hand_computed_images():
    """2 x 2 images, one pixel off by 0.1 in every channel: whole image MSE 0.01 / 4 (26.02 dB), that pixel alone 0.01
    (20 dB), the others inf, an empty region nan."""
    a = torch.zeros(1, 3, 2, 2)
    b = a.clone()
    b[..., 0, 0] = 0.1
    pixel = torch.zeros(1, 2, 2, dtype=torch.bool)
    pixel[0, 0, 0] = True
    assert region_psnr(b, a).item() == pytest.approx(10 * math.log10(400), rel=1e-5)
    assert region_psnr(b, a, pixel).item() == pytest.approx(20.0, rel=1e-5)
    assert math.isinf(region_psnr(b, a, ~pixel).item())
    assert math.isnan(region_psnr(b, a, torch.zeros_like(pixel)).item())


def test_precision_recall_curve_on_hand_computed_scores():
    scores, correct = [0.9, 0.8, 0.8, 0.3, float("nan")], [1, 0, 1, 0, 1]
    curve = pr_curve(scores, correct)
    assert curve["threshold"] == [0.9, 0.8, 0.3]
    assert curve["precision"] == pytest.approx([1, 2 / 3, 2 / 4])
    assert curve["recall"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])  # the nan-scored correct pair is never kept
    assert at_threshold(scores, correct, 0.8) == pytest.approx({"threshold": 0.8, "precision": 2 / 3, "recall": 2 / 3})
    assert best_f1(curve)["threshold"] == 0.8
    columns = {"filter_kept": [1, 1, 1, 0, 0], "gt_correct": [1, 0, 0, 1, 0]}
    assert filter_summary(columns) == pytest.approx({"kept": 60.0, "precision": 100 / 3, "recall": 50.0})


@pytest.mark.parametrize("value", [None, True, 3, 0.15, "shared", "a b's", {"inner_steps": 10, "x": [1, 2.5]}, [0.2, 0.8]])
def test_override_values_parse_back_to_themselves(value):
    parsed = OverridesParser.create().parse_override(f"editor.key={hydra_value(value)}").value()
    assert parsed == value


def test_entries_compose_the_editor_configs_generate_would_build():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="benchmark")
        entries = {entry.name: entry for entry in editor_entries(cfg.editors)}
        for entry in entries.values():  # the recorded command is the config
            assert entry.cfg == generate_config(entry.command.split()[2:]).editor, entry.name
        with pytest.raises(BenchmarkError, match="typo.*xa_guidanse"):
            editor_entries(OmegaConf.create({"typo": {"editor": "pix2pix_zero", "overrides": {"xa_guidanse": 1}}}))
    assert {"pix2pix_zero", "p2p", "word_swap", "sdedit"} <= set(entries)
    assert entries["pix2pix_zero_no_reg"].cfg.regularizer is None and entries["pix2pix_zero"].cfg.regularizer is not None
    assert [entries[f"pix2pix_zero_xa_{name}"].cfg.xa_guidance_real for name in ("0_15", "0_5", "1_5", "3")] == [0.15, 0.5, 1.5, 3.0]
    assert entries["pix2pix_zero_no_xa"].cfg.xa_guidance_real == 0.0
    assert entries["pix2pix_zero_shared_update"].cfg.xa_update == "shared"
    assert entries["pix2pix_zero_direct_inversion"].cfg.inversion == "direct" and entries["p2p_direct_inversion"].cfg.inversion == "direct"
    assert entries["pix2pix_zero_word_direction"].direction == "words"
    for entry in entries.values():  # every row runs the same budget
        assert entry.cfg.num_inference_steps == cfg.steps and entry.cfg.get("num_inversion_steps", cfg.steps) == cfg.steps


class Unchanged(Editor):
    """Returns its inputs: the editor that does nothing."""

    def __init__(self, backbone, resolution, compile=False):
        pass

    def edit(self, batch: EditBatch) -> EditResult:
        return EditResult(batch.images, batch.images.clone(), torch.ones(len(batch.seeds), dtype=torch.bool), 0, 0.0)


class Oracle(Unchanged):
    """Returns each input's true edit (`answers`: image bytes -> true edit)."""

    answers: dict[bytes, torch.Tensor] = {}

    def edit(self, batch: EditBatch) -> EditResult:
        edited = torch.stack([self.answers[image.numpy().tobytes()] for image in batch.images])
        return EditResult(batch.images, edited, torch.ones(len(batch.seeds), dtype=torch.bool), 0, 0.0)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset's run, and its report."""
    out = tmp_path_factory.mktemp("benchmark")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=["benchmark/preset=smoke", f"out={out / 'a'}", f"cache_dir={out / 'cache'}"])
        benchmark = EditorBenchmark(cfg)
        result = benchmark.run()
    write_report(result, out / "a")
    return benchmark, result, out


@needs_weights
def test_an_editor_that_returns_its_input_is_never_correct_and_the_truth_always(smoke):
    benchmark, result, _ = smoke
    s = result.sets[0]
    measure = SetMeasure(benchmark.models, s.set)
    Oracle.answers = {image.numpy().tobytes(): truth for image, truth in zip(s.set.images, s.set.truth)}
    for editor, expected in (("Unchanged", 0.0), ("Oracle", 1.0)):
        entry = EditorEntry(editor, editor, "test", {}, "banks", OmegaConf.create({"_target_": f"{__name__}.{editor}"}))
        row = benchmark.run_entry(entry, s.set, measure, slice(0, 2))
        assert row.columns["gt_correct"] == [expected] * len(s.set), editor
        depicted = "nearest_input" if editor == "Unchanged" else "nearest_true_edit"
        assert row.columns[depicted] == [1.0] * len(s.set), editor


@needs_weights
def test_smoke_report_has_every_table_picture_and_reference(smoke):
    _, result, out = smoke
    report = json.loads((out / "a" / "report.json").read_text())
    assert list(report["sets"]) == list(TASKS) and list(report["editors"]) == ["pix2pix_zero", "sdedit"]
    for task, entry in report["sets"].items():
        rows = entry["rows"]
        assert list(rows) == ["input", "true_edit", "true_edit_vae", "pix2pix_zero", "sdedit"]
        assert rows["input"]["ground_truth"]["correct"] == 0.0 and rows["true_edit"]["ground_truth"]["correct"] == 100.0
        assert rows["true_edit"]["ground_truth"]["psnr"] == "inf" and rows["input"]["ground_truth"]["bg_psnr"] == "inf"
        assert rows["true_edit_vae"]["ground_truth"]["correct"] == 100.0  # the VAE alone does not spoil a toy edit
        assert rows["input"]["nearest"]["input"] == 100.0 and rows["true_edit"]["nearest"]["true_edit"] == 100.0
        for row in rows.values():
            assert set(row) >= {"ground_truth", "nearest", "paper", "pie_bench", "filters"}
            assert sum(row["nearest"].values()) == pytest.approx(100.0)  # every (finite) edit depicts one candidate
            assert set(row["pie_bench"]) == {"structure", "bg_psnr", "bg_lpips", "bg_mse", "bg_ssim", "clip_whole", "clip_edited"}
        assert set(rows["sdedit"]["filters"]) == {"kept", "precision", "recall"}
        thresholded = {name for name, value in entry["thresholds"].items() if value is not None}
        assert set(entry["filter_curves"]) == thresholded  # outline2filled: clip_gain only (no seg_iou threshold)
        assert (out / "a" / report["pictures"]["grids"][task]).is_file() and (out / "a" / report["pictures"]["pr"][task]).is_file()
        cost = report["cost"]["sets"][task]
        assert cost["pix2pix_zero"]["s_per_pair"] > 0 and cost["pix2pix_zero"]["cpu_s_per_pair"] > 0
        assert cost["pix2pix_zero"]["unet_evals_per_pair"] > cost["sdedit"]["unet_evals_per_pair"]
    assert (out / "a" / "structure_vs_clip.png").is_file() and (out / "a" / "correct_vs_cost.png").is_file()
    markdown = (out / "a" / "report.md").read_text()
    for heading in ("## Ranking", "### Nearest render", "## Summary: correct edits (%)", "python generate.py editor=pix2pix_zero"):
        assert heading in markdown
    ranking = report["ranking"]
    assert list(ranking)[-3:] == ["input", "true_edit", "true_edit_vae"]  # the editors first, best first
    rates = [ranking[name]["ground_truth"]["correct"] for name in list(ranking)[:2]]
    assert rates == sorted(rates, reverse=True)
    for name, row in ranking.items():  # pooled over the sets: the sets' mean (equal sizes), kept/correct counted over all
        per_set = [entry["rows"][name] for entry in report["sets"].values()]
        assert row["ground_truth"]["correct"] == pytest.approx(np.mean([r["ground_truth"]["correct"] for r in per_set]), abs=1e-4)
        assert row["paper"]["structure_dist"] == pytest.approx(np.mean([r["paper"]["structure_dist"] for r in per_set]), abs=1e-5)
        assert row["filters"]["kept"] == pytest.approx(np.mean([r["filters"]["kept"] for r in per_set]), abs=1e-4)
    pairs = [json.loads(line) for line in (out / "a" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == len(TASKS) * 5 * 4 and {"gt_correct", "pie_bg_psnr", "filter_clip_gain", "filter_kept"} <= set(pairs[0])


@needs_weights
def test_the_report_is_the_same_for_the_same_seeds(smoke):
    """A second run of the second task alone gives its numbers, pairs and grid exactly (its scenes and seeds do not depend
    on the tasks before it); only the costs differ."""
    _, _, out = smoke
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=["benchmark/preset=smoke", "source.tasks=[plain2striped]",
                                                          f"out={out / 'b'}", f"cache_dir={out / 'cache'}"])
        write_report(EditorBenchmark(cfg).run(), out / "b")
    first, second = (json.loads((out / run / "report.json").read_text()) for run in "ab")
    assert second["sets"]["plain2striped"] == first["sets"]["plain2striped"]
    assert (out / "b" / "grids" / "plain2striped.png").read_bytes() == (out / "a" / "grids" / "plain2striped.png").read_bytes()
    lines = {run: [line for line in (out / run / "pairs.jsonl").read_text().splitlines() if '"plain2striped"' in line] for run in "ab"}
    assert lines["a"] and lines["b"] == lines["a"]
    assert second["editors"] == first["editors"]


@needs_weights
def test_word_direction_is_the_words_own_embeddings(smoke):
    benchmark, _, _ = smoke
    backbone = benchmark.backbone
    direction = word_direction(backbone, "circle", "square")
    expected = backbone.encode_text(["square"]).float() - backbone.encode_text(["circle"]).float()
    assert torch.allclose(direction, expected.cpu(), atol=1e-6)
    entry = next(e for e in benchmark.entries if e.name == "pix2pix_zero")
    banks = benchmark.direction(entry, benchmark.sets[0], slice(None))
    assert not torch.allclose(banks, direction, atol=1e-3)  # the sentence banks' direction is another one


@needs_weights
def test_every_toy_editor_entry_runs_in_the_smoke_setting(smoke):
    """Each entry of benchmark/editors=toy (every editor, every ablation) edits two scenes at 2 steps, and its edits are
    measured: finite, with the cost counted."""
    _, _, out = smoke
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=[
            "benchmark/preset=smoke", "benchmark/editors=toy", "source.tasks=[circle2square]", "source.n=2",
            f"out={out / 'toy'}", f"cache_dir={out / 'cache'}"])
        result = EditorBenchmark(cfg).run()
    (s,) = result.sets
    assert [row.name for row in s.editors] == list(cfg.editors)
    for row in s.editors:
        assert row.non_finite == 0 and row.unet_evals > 0 and row.seconds > 0, row.name
        assert len(row.columns["gt_correct"]) == 2 and all(math.isfinite(v) for v in row.columns["gt_psnr"]), row.name
