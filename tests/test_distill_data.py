"""distill.data: threshold selection while reading, rank/worker split, paired augmentation, resumable stream."""
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from distill.data import PairAugment, PairDataError, PairDataModule, PairStream, shard_urls

RESOLUTION = 32


def smooth_image(rng: np.random.Generator, resolution: int = RESOLUTION) -> np.ndarray:
    """A random low-frequency RGB image (H x W x 3 uint8): learnable, and far from flat."""
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 4, 4)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=resolution, mode="bilinear", align_corners=False)
    return fine[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pair_shards(out_dir: Path, count: int = 8, per_shard: int = 4, resolution: int = RESOLUTION,
                      target=lambda x: 255 - x, scores=lambda i: {"seg_iou": i / 10, "clip_gain": 0.2}) -> Path:
    """A generation output directory in the shard contract: shards/pairs-NNNNNN.tar and config.yaml.

    Pair i has input x_i (smooth random), edited target(x_i) (default: inverted colours) and scores(i).
    """
    rng = np.random.default_rng(0)
    (out_dir / "shards").mkdir(parents=True)
    for first in range(0, count, per_shard):
        with wds.TarWriter(str(out_dir / "shards" / f"pairs-{first // per_shard:06d}.tar")) as writer:
            for i in range(first, min(count, first + per_shard)):
                image = smooth_image(rng, resolution)
                key = f"{i:09d}"
                meta = {"key": key, "task": "invert", "seed": i, "scores": scores(i)}
                writer.write({"__key__": key, "input.png": png(image), "edited.png": png(target(image)),
                              "json": json.dumps(meta).encode()})
    (out_dir / "config.yaml").write_text("task:\n  name: invert\n  thresholds:\n    seg_iou: 0.35\n    clip_gain: null\n")
    return out_dir


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pair_shards(tmp_path_factory.mktemp("gen"))


def keys_of(stream, n=None) -> list[str]:
    samples = iter(stream)
    return [next(samples)["key"] for _ in range(n)] if n else [sample["key"] for sample in samples]


def validation_stream(urls, thresholds, resolution=RESOLUTION) -> PairStream:
    return PairStream(urls, thresholds, PairAugment(resolution, crop_scale=(1, 1), flip=False), train=False)


def test_thresholds_select_exactly_the_passing_pairs(pairs):
    urls = shard_urls(str(pairs))
    assert [Path(u).name for u in urls] == ["pairs-000000.tar", "pairs-000001.tar"]
    # seg_iou of pair i is i / 10: >= 0.35 keeps 4..7; a missing score fails
    assert keys_of(validation_stream(urls, {"seg_iou": 0.35})) == [f"{i:09d}" for i in range(4, 8)]
    assert keys_of(validation_stream(urls, {"seg_iou": 0.35, "clip_gain": 0.3})) == []
    assert keys_of(validation_stream(urls, {"seg_iou": None, "clip_gain": 0.1})) == [f"{i:09d}" for i in range(8)]
    assert len(keys_of(validation_stream(urls, {"missing": 0.0}))) == 0


def test_thresholds_default_to_the_generation_run_and_holdout_is_disjoint(pairs):
    data = PairDataModule(str(pairs), RESOLUTION, PairAugment(RESOLUTION), batch_size=1, holdout_fraction=0.5,
                          num_workers=0)
    data.setup("fit")
    assert data.thresholds == {"seg_iou": 0.35, "clip_gain": None}  # from config.yaml
    held_out = set(keys_of(data.val_set))
    trained = set(keys_of(data.train_set, n=40))
    assert held_out and trained and held_out.isdisjoint(trained)
    assert held_out | trained == {f"{i:09d}" for i in range(4, 8)}


def test_ranks_and_workers_share_each_epoch_without_duplicates(pairs):
    """2 ranks x 2 workers: in every epoch each kept pair goes to exactly one (rank, worker)."""
    urls = shard_urls(str(pairs))
    seen = []
    for rank in range(2):
        stream = PairStream(urls, {}, PairAugment(RESOLUTION), train=True, seed=3, shuffle_buffer=4)
        stream.rank, stream.world_size = rank, 2
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2)
        batches = iter(loader)
        # 4 pairs per rank and epoch, batches alternate workers: 2 batches of 2 = one epoch of both workers
        seen.append([[key for _ in range(2) for key in next(batches)["key"]] for _epoch in range(2)])
    for epoch in range(2):
        keys = seen[0][epoch] + seen[1][epoch]
        assert sorted(keys) == [f"{i:09d}" for i in range(8)]


def test_stream_started_at_batch_n_continues_the_unbroken_stream(pairs):
    urls = shard_urls(str(pairs))

    def batches(start: int, count: int) -> list[torch.Tensor]:
        stream = PairStream(urls, {}, PairAugment(RESOLUTION, brightness=0.3, noise_std=0.1), train=True,
                            seed=1, shuffle_buffer=3, batch_size=3)
        stream.start_batch = start
        loader = iter(torch.utils.data.DataLoader(stream, batch_size=3, num_workers=2))
        return [next(loader)["input"] for _ in range(count)]

    unbroken = batches(0, 8)
    # 5 batches: worker 0 made 3 (9 samples: 2 epochs of its 4 pairs and one more), worker 1 made 2
    resumed = batches(5, 3)
    for a, b in zip(unbroken[5:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_augmentation_keeps_input_and_target_aligned():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(smooth_image(rng, 48)).permute(2, 0, 1).float() / 255
    jitter = PairAugment(RESOLUTION, crop_scale=(0.3, 1.0), brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2)
    geometric = PairAugment(RESOLUTION, crop_scale=(0.3, 1.0))
    for seed in range(6):
        # identical images stay identical under the shared crop, flip and colour jitter
        a, b = jitter(image, image.clone(), seed)
        assert a.shape == (3, RESOLUTION, RESOLUTION)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        # a target that is a pixelwise function of the input stays that function of it
        a, b = geometric(image, 1 - image, seed)
        torch.testing.assert_close(b, 1 - a, rtol=0, atol=1e-6)
    # different seeds give different crops (the test above is not vacuous)
    assert not torch.equal(geometric(image, image, 0)[0], geometric(image, image, 1)[0])


def test_quarter_turns_turn_input_and_target_together_through_all_eight_symmetries():
    image = torch.from_numpy(smooth_image(np.random.default_rng(1), RESOLUTION)).permute(2, 0, 1).float() / 255
    turned = PairAugment(RESOLUTION, crop_scale=(1, 1), flip=True, rotate90=True)
    symmetries = [image.rot90(k, (1, 2)) for k in range(4)]
    symmetries += [view.flip(-1) for view in symmetries]
    seen = set()
    for seed in range(64):
        a, b = turned(image, 1 - image, seed)
        torch.testing.assert_close(b, 1 - a, rtol=0, atol=1e-6)
        [index] = [i for i, view in enumerate(symmetries) if torch.allclose(a, view, atol=1e-6)]
        seen.add(index)
    assert seen == set(range(8))


def test_noise_goes_to_the_input_only_with_its_std_in_the_generators_units(pairs):
    def stream(noise_std: float) -> list[dict]:
        return list(PairStream(shard_urls(str(pairs)), {}, PairAugment(RESOLUTION, crop_scale=(1, 1), flip=False,
                                                                       noise_std=noise_std), train=False))

    clean, noisy = stream(0.0), stream(0.1)
    for a, b in zip(clean, noisy):
        torch.testing.assert_close(b["target"], a["target"], rtol=0, atol=0)
    # the stream yields what the generator sees, in [-1, 1]: there the added noise has the configured std
    added = torch.stack([b["input"] - a["input"] for a, b in zip(clean, noisy)])
    assert added.numel() == 8 * 3 * RESOLUTION**2 and added.std().item() == pytest.approx(0.1, rel=0.03)


def test_batch_size_is_global_and_each_device_loads_its_share(pairs):
    def device_batches(batch_size: int, world_size: int) -> tuple[int, int, int]:
        data = PairDataModule(str(pairs), RESOLUTION, PairAugment(RESOLUTION), batch_size=batch_size, num_workers=0)
        data.trainer = SimpleNamespace(world_size=world_size, global_rank=world_size - 1, global_step=0)
        data.setup("fit")
        return data.train_dataloader().batch_size, data.train_set.batch_size, data.val_dataloader().batch_size

    assert device_batches(64, 1) == (64, 64, 64)
    assert device_batches(64, 4) == (16, 16, 16)   # 4 devices x 16: the paper's 64 per step
    with pytest.raises(PairDataError, match=r"data.batch_size=64 is the global batch.*over 3 devices"):
        device_batches(64, 3)
