"""Generation at scale: separate worker processes, kill -9 and resume, bad inputs, verify.

Runs use random tiny components with one inversion and one edit step: the properties tested (which pair
goes where, byte equality across process layouts, resume) do not depend on the steps."""
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from datagen import launch
from datagen.editors.pix2pix_zero import Pix2PixZero
from datagen.shards import ShardWriter, finished_shards, read_jsonl
from datagen.verify import verify_run
from test_generate import REPO, TINY, generate_config

NO_LAUNCHER: dict[str, str] = {}  # the test process's own environment must not decide worker ranks


def synthetic(out_dir: Path, cache_dir: Path, *overrides: str):
    return generate_config(out_dir, cache_dir, "num_pairs=5", "shard_size=2", "batch_size=2", *overrides)


def pairs(run_dir: Path) -> dict[str, dict]:
    """Every finished sample: its image bytes and its json without the timings (the only field a rerun changes)."""
    samples = {}
    for record in finished_shards(run_dir).values():
        with tarfile.open(run_dir / "shards" / record.shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext == "json":
                    data = {k: v for k, v in json.loads(data).items() if k != "timings"}
                samples.setdefault(key, {})[ext] = data
    return samples


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("directions")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, cache_dir) -> Path:
    """One worker, one uninterrupted run: the reference every other layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("unbroken") / "run"
    launch.run_workers(synthetic(run_dir, cache_dir), NO_LAUNCHER)
    return run_dir


def test_unbroken_run_makes_every_pair_once(unbroken):
    records = finished_shards(unbroken)
    assert sorted(records) == [0, 1, 2]
    assert [records[s].keys for s in range(3)] == [["000000000", "000000001"], ["000000002", "000000003"], ["000000004"]]
    assert len(read_jsonl(unbroken / "manifest.jsonl")) == 3
    stats = json.loads((unbroken / "stats.json").read_text())
    assert (stats["written"], stats["shards_done"], stats["rejected"]) == (5, 3, {})
    assert stats["unet_evals_per_pair"] == 6  # one step: 2 x (reference, guidance, guided edit)


def test_two_worker_processes_split_the_job_and_equal_one_worker(tmp_path, cache_dir, unbroken):
    """devices=2: one command, two spawned worker processes (ranks 0 and 1 of 2) sharing only the out_dir."""
    launch.run_workers(synthetic(tmp_path / "run", cache_dir, "devices=2"), NO_LAUNCHER)
    rows = read_jsonl(tmp_path / "run" / "manifest.jsonl")
    assert sorted(row["index"] for row in rows) == [0, 1, 2]  # each shard made once: disjoint
    assert sorted(key for row in rows for key in row["keys"]) == [f"{i:09d}" for i in range(5)]  # union = the job
    assert pairs(tmp_path / "run") == pairs(unbroken)  # sample for sample, byte for byte


def test_a_submitit_array_of_two_equals_one_worker(tmp_path, cache_dir, unbroken):
    """The cluster command as README gives it, through hydra-submitit-launcher's local executor (same pickling,
    one process per array element as on SLURM): `-m worker.count=2 'worker.rank=range(2)'`."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    command = [sys.executable, "generate.py", "-m", "hydra/launcher=submitit_local", "worker.count=2", "worker.rank=range(2)",
               *TINY, "num_pairs=5", "shard_size=2", "batch_size=2", f"out_dir={tmp_path / 'run'}",
               f"cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = verify_run(tmp_path / "run")
    assert report.ok and report.shards_ok == report.shards_total == 3
    assert pairs(tmp_path / "run") == pairs(unbroken)


def killed_on_second_write(cfg) -> None:
    """A worker that dies (SIGKILL, no cleanup of any kind) while writing shard 1, after its first sample."""
    written = []
    original = ShardWriter.write

    def write(self, key, *args):
        if self.index == 1 and written:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, key, *args)
        if self.index == 1:
            written.append(key)

    ShardWriter.write = write
    launch.run_workers(cfg, NO_LAUNCHER)


def test_run_killed_mid_shard_resumes_to_the_unbroken_result(tmp_path, cache_dir, unbroken):
    cfg = synthetic(tmp_path / "run", cache_dir)
    worker = multiprocessing.get_context("forkserver").Process(target=killed_on_second_write, args=(cfg,))
    worker.start()
    worker.join()
    assert worker.exitcode == -signal.SIGKILL
    assert sorted(finished_shards(tmp_path / "run")) == [0]
    assert [p.name for p in (tmp_path / "run" / "shards").glob(".pairs-000001.tar.*.tmp")]  # the half-written shard

    launch.run_workers(cfg, NO_LAUNCHER)
    rows = read_jsonl(tmp_path / "run" / "manifest.jsonl")
    assert sorted(row["index"] for row in rows) == [0, 1, 2]  # shard 0 was not redone
    assert not list((tmp_path / "run" / "shards").glob("*.tmp"))
    assert pairs(tmp_path / "run") == pairs(unbroken)


def test_background_png_encoding_writes_the_same_shard_in_write_order(tmp_path):
    """A 512 px noise image first, small ones after: its encoding finishes last, its sample still goes first, and
    the shard is the inline writer's byte for byte (both threads busy, at most 2 samples waiting)."""
    images = [torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0))]
    images += [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(1, 7)]
    records = []
    for encoder, folder in ((None, "inline"), (ThreadPoolExecutor(max_workers=2), "threads")):
        writer = ShardWriter(tmp_path / folder, 0, encoder, max_pending=2)
        for i, image in enumerate(images):
            writer.write(f"{i:09d}", image, 1 - image, {"index": i})
        records.append(writer.close())
    inline, threaded = records
    assert threaded.keys == inline.keys == [f"{i:09d}" for i in range(7)]
    assert threaded.sha256 == inline.sha256
    with tarfile.open(tmp_path / "threads" / "shards" / threaded.shard) as tar:
        assert [member.name for member in tar][:3] == ["000000000.edited.png", "000000000.input.png", "000000000.json"]


def test_other_settings_on_an_existing_out_dir_are_refused(unbroken, cache_dir):
    with pytest.raises(launch.job.ConfigError, match=r"other settings \(editor, seed, source differ\)"):
        launch.run_workers(synthetic(unbroken, cache_dir, "seed=1", "editor.guidance_scale=3"), NO_LAUNCHER)


def test_compile_is_a_runtime_setting_the_worker_applies(unbroken, cache_dir):
    """Like `device`, `compile` changes float rounding, not what a pair is: an out_dir made eager resumes compiled.
    (That a compiled editor makes the eager pair is tests/test_editor.py's.)"""
    cfg = synthetic(unbroken, cache_dir, "compile={backend:eager}")
    planned = launch.job.plan_job(cfg)
    launch.job.claim_out_dir(planned, unbroken)  # not refused
    worker = launch.job.Worker(planned, unbroken)
    assert isinstance(worker.editor.backbone.unet, torch._dynamo.eval_frame.OptimizedModule)


def test_verify_passes_a_whole_run_and_names_a_truncated_shard(tmp_path, cache_dir, unbroken, capsys):
    assert verify_run(unbroken).ok
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    shard = run_dir / "shards" / "pairs-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = verify_run(run_dir)
    assert not report.ok and (report.shards_ok, report.pairs_ok) == (2, 3)
    assert all("pairs-000001.tar" in problem for problem in report.problems)
    assert any("checksum" in problem for problem in report.problems)
    assert launch.main(synthetic(run_dir, cache_dir, "verify=true")) == 1  # generate.py ... verify=true
    assert "2 of 3 shards verified (3 pairs)" in capsys.readouterr().out


def test_non_finite_latents_reject_the_sample_not_its_batch(tmp_path, cache_dir, monkeypatch):
    initial_noise = Pix2PixZero.initial_noise

    def poisoned(self, seeds):  # seed 1's x_T holds a NaN; the engine must carry it to its own sample only
        noise = initial_noise(self, seeds)
        if 1 in seeds:
            noise[seeds.index(1), 0, 0, 0] = float("nan")
        return noise

    monkeypatch.setattr(Pix2PixZero, "initial_noise", poisoned)
    launch.run_workers(generate_config(tmp_path / "run", cache_dir, "num_pairs=3", "batch_size=3"), NO_LAUNCHER)
    (record,) = finished_shards(tmp_path / "run").values()
    assert record.keys == ["000000000", "000000002"]
    assert [(r["index"], r["reason"]) for r in record.rejects] == [(1, "non-finite latents")]
    assert read_jsonl(tmp_path / "run" / "rejects.jsonl") == [{"shard": 0, **record.rejects[0]}]


def test_folder_with_bad_files_makes_pairs_of_the_good_ones_and_logs_the_rest(tmp_path, cache_dir, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (80, 64), (0, 0, 255)).save(images / "blue.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(images / "clear.png")  # fully transparent: composited on white
    Image.new("CMYK", (64, 96), (0, 255, 255, 0)).save(images / "sub" / "cmyk.jpg", quality=95)  # red
    Image.new("I;16", (64, 64), 30000).save(images / "sub" / "grey16.png")  # 16-bit: 30000 / 257 = 116.7
    (images / "blue.txt").write_text("a photo of a cat")  # captioned; the others get BLIP's (tiny) captions
    good = (images / "blue.png").read_bytes()
    (images / "cut.png").write_bytes(good[: len(good) // 2])
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.webp").write_text("not an image")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(images / "speck.png")
    Image.new("RGB", (300, 300), (0, 0, 0)).save(images / "sub" / "poster.bmp")
    cfg = generate_config(tmp_path / "run", cache_dir, "source=folder", f"source.path={images}", "source.max_pixels=50000",
                 "shard_size=4", "batch_size=2")

    assert launch.main(cfg) == 0
    rejects = {row["detail"].split(":")[0]: row["reason"] for row in read_jsonl(tmp_path / "run" / "rejects.jsonl")}
    assert rejects == {"cut.png": "unreadable", "empty.jpg": "empty file", "notes.webp": "unreadable",
                       "speck.png": "too small", "sub/poster.bmp": "too large"}
    made = {sample["json"]["source"]: sample for sample in pairs(tmp_path / "run").values()}
    assert sorted(made) == ["blue.png", "clear.png", "sub/cmyk.jpg", "sub/grey16.png"]
    assert made["blue.png"]["json"]["caption"] == "a photo of a cat"
    expected_rgb = {"blue.png": (0, 0, 255), "clear.png": (255, 255, 255), "sub/cmyk.jpg": (255, 0, 0),
                    "sub/grey16.png": (117, 117, 117)}
    for name, rgb in expected_rgb.items():
        pixels = np.asarray(Image.open(io.BytesIO(made[name]["input.png"])))
        assert pixels.shape == (64, 64, 3)
        np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), rgb, atol=3)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["written"] == 4 and stats["rejected"] == {"empty file": 1, "too large": 1, "too small": 1, "unreadable": 2}
    assert "rejected             5 (empty file 1, too large 1, too small 1, unreadable 2)" in capsys.readouterr().out
    assert verify_run(tmp_path / "run").ok  # pairs + rejects account for every sample index


# The other teachers through the same worker, on captioned real images (their inversion path): one step each.
EDITOR_STEPS = {"p2p": ["editor.num_inference_steps=1"], "word_swap": ["editor.num_inference_steps=1"],
                "sdedit": ["editor.num_inference_steps=2", "editor.strength=0.5"],
                "pix2pix_zero": ["editor.inversion=direct"]}
CAPTIONS = ["a photo of a cat", "a cat on a sofa", "a black cat", "a small cat in the snow", "a photo of a dog"]


def editor_config(out_dir: Path, cache_dir: Path, images: Path, editor: str):
    """TINY with `editor` and its own step settings, over `images` in shards of 2."""
    tiny = [o for o in TINY if not o.startswith("editor.")] if editor != "pix2pix_zero" else TINY
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("generate", [*tiny, f"editor={editor}", *EDITOR_STEPS[editor], f"out_dir={out_dir}",
                                    f"cache_dir={cache_dir}", "source=folder", f"source.path={images}", "num_pairs=5",
                                    "shard_size=2", "batch_size=2"])


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """Five images with their captions beside them; the last caption has no "cat" for cat2dog's swap to edit."""
    images = tmp_path_factory.mktemp("captioned")
    generator = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    return images


@pytest.mark.parametrize("editor", ["p2p", "word_swap", "sdedit", "pix2pix_zero"])
def test_every_editor_writes_pairs_and_a_killed_run_resumes_to_the_same_bytes(tmp_path, cache_dir, captioned, editor):
    launch.run_workers(editor_config(tmp_path / "unbroken", cache_dir, captioned, editor), NO_LAUNCHER)
    unbroken = pairs(tmp_path / "unbroken")
    edited = ["0.png", "1.png", "2.png", "3.png"] + (["4.png"] if editor == "pix2pix_zero" else [])
    assert sorted(sample["json"]["source"] for sample in unbroken.values()) == edited
    target = {s["json"]["caption"]: s["json"].get("target_prompt") for s in unbroken.values()}
    if editor == "pix2pix_zero":  # edits along its direction: it needs no target prompt, so takes the dog too
        assert set(target.values()) == {None}
        assert {s["json"]["inversion"]["method"] for s in unbroken.values()} == {"direct"}
    else:
        assert target["a small cat in the snow"] == "a small dog in the snow"
    rejects = read_jsonl(tmp_path / "unbroken" / "rejects.jsonl")
    expected_rejects = [(4, "prompt not editable")] if editor != "pix2pix_zero" else []
    assert [(row["index"], row["reason"]) for row in rejects] == expected_rejects
    assert verify_run(tmp_path / "unbroken").ok

    cfg = editor_config(tmp_path / "run", cache_dir, captioned, editor)
    worker = multiprocessing.get_context("forkserver").Process(target=killed_on_second_write, args=(cfg,))
    worker.start()
    worker.join()
    assert worker.exitcode == -signal.SIGKILL and sorted(finished_shards(tmp_path / "run")) == [0]
    launch.run_workers(cfg, NO_LAUNCHER)
    assert pairs(tmp_path / "run") == unbroken
