import torch
from omegaconf import OmegaConf

from datagen import directions
from engine_fixtures import make_backbone


def test_direction_is_difference_of_mean_embeddings_and_cached(tmp_path, monkeypatch):
    backbone = make_backbone()
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("a photo of a cat\na cat on a sofa\n\na sleepy cat\n")
    tgt.write_text("a photo of a dog\na dog on a sofa\n")
    task = OmegaConf.create({"source_bank": str(src), "target_bank": str(tgt), "direction": None})
    direction = directions.edit_direction(backbone, task, cache_dir=tmp_path / "cache")
    expected = backbone.encode_text(["a photo of a dog", "a dog on a sofa"]).mean(0) - backbone.encode_text(
        ["a photo of a cat", "a cat on a sofa", "a sleepy cat"]).mean(0)
    assert direction.shape == (1, 77, 32)
    torch.testing.assert_close(direction[0], expected, rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2

    calls = []
    monkeypatch.setattr(directions, "mean_embedding", lambda *a, **k: calls.append(1))
    again = directions.edit_direction(backbone, task, cache_dir=tmp_path / "cache")
    assert calls == [] and torch.equal(again, direction)  # served from the cache

    tgt.write_text("a photo of a horse\n")  # new bank contents: a new cache entry, not a stale hit
    monkeypatch.undo()
    changed = directions.edit_direction(backbone, task, cache_dir=tmp_path / "cache")
    assert not torch.allclose(changed, direction)


def test_precomputed_pt_banks_load(tmp_path):
    backbone = make_backbone()
    cat, dog = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    torch.save(cat, tmp_path / "cat.pt")
    torch.save(dog, tmp_path / "dog.pt")
    task = OmegaConf.create({"source_bank": str(tmp_path / "cat.pt"), "target_bank": str(tmp_path / "dog.pt")})
    torch.testing.assert_close(directions.edit_direction(backbone, task), dog - cat)
