"""Evaluation: each metric on constructed cases, and the report on tiny shards with a scripted student."""
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from datagen.shards import finished_shards
from distill.losses import build_lpips, psnr
from evaluation.evaluator import EvaluationError
from evaluation.job import run
from evaluation.metrics import ClipMargin, KeySelfSimilarity, background_lpips, l1_distance, structure_distance
from evaluation.report import METRICS
from filters.clip_gain import ClipEncoder
from filters.loading import MissingModelError
from run_fixtures import CONF, write_run



class MeanColourClip(ClipEncoder):
    """A CLIP whose image feature is the mean colour and whose texts are colour axes: exact, known similarities."""

    AXES = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}

    def __init__(self):
        super().__init__(nn.Identity(), logit_scale=100.0)
        self.projection = nn.Linear(3, 3, bias=False)
        nn.init.eye_(self.projection.weight)

    def image_features(self, pixels):
        return self.projection(pixels.mean((2, 3)))

    def text_features(self, texts):
        return torch.tensor([self.AXES[text] for text in texts])


def solid(colour: list[float], size: int = 16) -> torch.Tensor:
    """One image of a colour given in [0, 1], as a 1 x 3 x size x size batch in [-1, 1]."""
    return (torch.tensor(colour).view(1, 3, 1, 1) * 2 - 1).expand(1, 3, size, size)


def test_clip_margin_is_the_cosine_to_the_target_minus_the_cosine_to_the_source():
    margin = ClipMargin(MeanColourClip(), source_text="red", target_text="green")
    edits = torch.cat([solid([0, 1, 0]), solid([1, 0, 0]), solid([0.6, 0.8, 0]), solid([0, 0, 1])])
    # unit colours: green (1 - 0), red (0 - 1), 3-4-5 (0.8 - 0.6), blue (orthogonal to both)
    assert margin(edits) == pytest.approx([1.0, -1.0, 0.2, 0.0], abs=1e-6)


@pytest.fixture(scope="module")
def self_similarity():
    return KeySelfSimilarity.tiny(seed=0)


def toy_like_clip_vision(folder: Path) -> KeySelfSimilarity:
    """The model=toy path on a tiny random CLIPModel saved as the toy world saves its CLIP (no processor files)."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=tower, vision_config=dict(image_size=32, patch_size=4, **tower), projection_dim=32)).save_pretrained(folder)
    return KeySelfSimilarity.from_clip(str(folder)).eval()


@pytest.mark.parametrize("tower", ["dino_like_vit", "clip_vision"])
def test_key_self_similarity_is_the_cosine_of_the_last_layers_keys(tower, self_similarity, tmp_path):
    if tower == "clip_vision":
        self_similarity = toy_like_clip_vision(tmp_path / "clip")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    similarity = self_similarity(images)  # 2 x 65 x 65: CLS and 8 x 8 patches
    vit = self_similarity.model
    with torch.no_grad():
        hidden = vit(pixel_values=self_similarity.preprocess((images + 1) / 2), output_hidden_states=True).hidden_states
        last = vit.layers[-1] if tower == "dino_like_vit" else vit.encoder.layers[-1]
        attention, norm = (last.attention, last.layernorm_before) if tower == "dino_like_vit" else (last.self_attn, last.layer_norm1)
        keys = torch.nn.functional.normalize(attention.k_proj(norm(hidden[-2])), dim=-1)
    assert similarity.shape == (2, 65, 65)
    torch.testing.assert_close(similarity, keys @ keys.transpose(1, 2))
    torch.testing.assert_close(similarity.diagonal(dim1=1, dim2=2), torch.ones(2, 65))


def test_structure_dist_is_zero_for_an_image_with_itself_and_grows_with_a_spatial_shuffle(self_similarity):
    torch.manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4) * 2 - 1, size=32, mode="bilinear")  # smooth layout
    blocks = image.unfold(2, 8, 8).unfold(3, 8, 8)  # 1 x 3 x 4 x 4 x 8 x 8: a 4 x 4 grid of 8 px blocks

    def shuffled(permutation: torch.Tensor) -> torch.Tensor:
        grid = blocks.reshape(1, 3, 16, 8, 8)[:, :, permutation].reshape(1, 3, 4, 4, 8, 8)
        return grid.permute(0, 1, 2, 4, 3, 5).reshape(1, 3, 32, 32)

    identity = torch.arange(16)
    assert torch.equal(shuffled(identity), image)
    two_swapped = identity.clone()
    two_swapped[[0, 15]] = two_swapped[[15, 0]]
    distances = structure_distance(self_similarity, torch.cat([image, shuffled(two_swapped), shuffled(torch.randperm(16))]), image.expand(3, -1, -1, -1))
    assert distances[0] == 0
    assert 0 < distances[1] < distances[2]


@pytest.fixture(scope="module")
def lpips():
    return build_lpips(pretrained=False)  # the package's linear heads on a random trunk: offline


def test_bg_lpips_sees_a_background_change_and_ignores_a_foreground_only_change(lpips):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True  # the object
    change = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    foreground_edit = torch.where(mask, change, image)
    background_edit = torch.where(mask, image, change)

    same, foreground, background = (background_lpips(lpips, edit, image, mask) for edit in (image, foreground_edit, background_edit))
    assert same.item() == 0 and foreground.item() == 0
    assert background.item() > 0.01
    assert lpips(foreground_edit, image).item() > 0.01  # unmasked, the same change would count


def test_l1_and_psnr_to_the_teacher_on_exact_cases():
    teacher = torch.rand(2, 3, 8, 8) * 1.6 - 0.8
    student = teacher + torch.tensor([0.0, 0.2]).view(2, 1, 1, 1)
    assert l1_distance(student, teacher) == pytest.approx([0.0, 0.2])
    assert psnr(student, teacher)[1].item() == pytest.approx(20.0)  # 10 log10(2^2 / 0.2^2)


def scripted_student(path: Path) -> Path:
    from hydra.utils import instantiate

    generator_cfg = OmegaConf.merge(OmegaConf.load(CONF / "generator" / "comodgan_256.yaml"),
                                    {k: v for k, v in OmegaConf.load(CONF / "generator" / "small.yaml").items() if k != "defaults"})
    torch.manual_seed(0)
    torch.jit.script(instantiate(generator_cfg).eval()).save(str(path))
    return path


def evaluate_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=[f"data.path={tmp_path / 'run'}", f"out={tmp_path / 'report'}", "device=cpu", *overrides])


def shard_pairs(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """key -> {"input", "edited"}: 3 x H x W in [0, 1], read from the finished shards with tarfile and PIL alone."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted((run_dir / "shards").glob("pairs-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, suffix = member.name.partition(".")
                if suffix.endswith(".png"):
                    image = Image.open(archive.extractfile(member)).convert("RGB")
                    pairs.setdefault(key, {})[suffix.removesuffix(".png")] = pil_to_tensor(image).float() / 255
    return pairs


def greener_than_red(images: torch.Tensor) -> float:
    """CLIP Acc under MeanColourClip with source "red", target "green": the share (%) of images, B x 3 x H x W in
    [0, 1], whose mean colour is closer in angle to green than to red, i.e. whose mean green exceeds their mean red."""
    red, green, _ = images.mean(dim=(2, 3)).unbind(1)
    return 100 * (green > red).float().mean().item()


def test_report_on_tiny_shards_gives_the_metrics_recomputed_from_the_pairs(tmp_path):
    """CLIP Acc of teacher and student and the student's L1 to the teacher, recomputed here from the shards' PNGs and
    the exported student alone. The run's CLIP is MeanColourClip with source "red", target "green": on random
    images the margins straddle 0 (measured: 3 of 6 teacher edits), so a flipped sign or a wrong share shows."""
    keys = write_run(tmp_path / "run", [{"seg_iou": 0.9, "clip_gain": 0.2}], resolution=32)
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    config.model.scorers.clip = {"_target_": "test_evaluate.MeanColourClip"}
    config.task.source_text, config.task.target_text = "red", "green"
    OmegaConf.save(config, tmp_path / "run" / "config.yaml")
    student = scripted_student(tmp_path / "generator.ts")  # 64 px: the 32 px inputs are resized up for it
    [report] = run(evaluate_config(tmp_path, f"student={student}", "batch_size=4", "cases=2"))
    document = json.loads((report.parent / "report.json").read_text())
    metrics = document["metrics"]

    pairs = shard_pairs(tmp_path / "run")
    assert document["pairs"] == len(keys) == len(pairs) and document["thresholds"] == {"seg_iou": 0.7, "clip_gain": 0.1}
    inputs, edited = (torch.stack([pairs[key][kind] for key in keys]) for kind in ("input", "edited"))
    # the student sees the inputs, and is compared with the edits, resized to its 64 px (bicubic, antialiased)
    resized = [F.interpolate(x * 2 - 1, size=64, mode="bicubic", antialias=True).clamp(-1, 1) for x in (inputs, edited)]
    with torch.no_grad():
        outputs = torch.jit.load(str(student))(resized[0])
    teacher_acc = greener_than_red(edited)
    assert 0 < teacher_acc < 100, teacher_acc
    assert metrics["clip_acc"] == {"teacher": teacher_acc, "student": greener_than_red((outputs + 1) / 2)}
    l1 = (outputs - resized[1]).abs().mean().item()
    assert metrics["l1_to_teacher"]["student"] == pytest.approx(l1, rel=1e-5, abs=0)
    # the controls: the L1 to the input, or to the edit not resized the student's way, would fail the check above
    assert abs((outputs - resized[0]).abs().mean().item() - l1) > 1e-3 * l1
    nearest = F.interpolate(edited * 2 - 1, size=64, mode="nearest")
    assert abs((outputs - nearest).abs().mean().item() - l1) > 1e-3 * l1

    rows = [line for line in report.read_text().splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    shown = [metric for metric in METRICS if metric.name != "ns_lpips"]  # NS-LPIPS only with ns_lpips=true
    assert len(rows) == len(shown) == len(metrics)
    for metric, row in zip(shown, rows):
        label, *cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert label.startswith(metric.label)
        for method, cell in zip(("teacher", "student"), cells):
            expected = metrics[metric.name].get(method)
            assert cell == "-" if expected is None else float(cell) == pytest.approx(expected, abs=0.51 * 10 ** -metric.decimals)
    records = finished_shards(tmp_path / "run").values()
    assert metrics["images_per_second"]["teacher"] == pytest.approx(sum(r.count for r in records) / sum(r.seconds for r in records))
    assert metrics["images_per_second"]["student"] > 0
    assert [json.loads(line)["key"] for line in (report.parent / "pairs.jsonl").read_text().splitlines()] == keys
    assert set(document["cases"]) == {f"teacher_{c}" for c in ("clip_margin", "structure_dist", "bg_lpips")} | {
        f"student_{c}" for c in ("clip_margin", "structure_dist", "bg_lpips", "lpips_to_teacher", "l1_to_teacher", "psnr_to_teacher")}
    for grid in document["cases"].values():
        assert (report.parent / grid).read_bytes()[:4] == b"\x89PNG"


def test_a_missing_student_or_metric_preset_is_one_clear_error(tmp_path):
    write_run(tmp_path / "run", [{"seg_iou": 0.9, "clip_gain": 0.2}], resolution=32)
    with pytest.raises(EvaluationError, match=r"student .*no/such.ts not found"):
        run(evaluate_config(tmp_path, f"student={tmp_path / 'no/such.ts'}"))
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    config.model.name = "sdxl"
    OmegaConf.save(config, tmp_path / "run" / "config.yaml")
    with pytest.raises(EvaluationError, match="no metric preset for model 'sdxl'"):
        run(evaluate_config(tmp_path))
    with pytest.raises(MissingModelError, match=r"Structure Dist's ViT '.*no_dino' is not available \(no such file or folder\)"):
        KeySelfSimilarity.from_pretrained(str(tmp_path / "no_dino"))
