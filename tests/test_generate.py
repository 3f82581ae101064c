"""generate.py as a user meets it: the CLI writes shards any webdataset reader opens, with the run's config;
mistakes are one readable line, before any model loads; sources and the worker split obey their rules."""
import dataclasses
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import diffusers
import huggingface_hub.utils
import pytest
import torch
import transformers
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from datagen import launch
from datagen.directions import load_sentences
from datagen.job import Summary, hide_loading_bars, plan_job
from datagen.launch import LauncherPlace, WorkerSlot, launcher_place, worker_slots
from datagen.sources import InputRejected, fit_image
from datagen.verify import verify_run

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Random tiny components, one inversion and one edit step: seconds per pair on a CPU.
TINY = ["model=tiny", "model.tiny.unet_channels=[16,32]", "model.tiny.vae_channels=[16,32]", "filters=none",
        "editor.num_inference_steps=1", "editor.num_inversion_steps=1", "cpu_threads=1", "device=cpu"]
SAMPLE_KEYS = {"key", "index", "task", "source_word", "target_word", "prompt", "seed", "model", "editor", "timings",
               "scores", "xa_loss", "source"}


def generate_config(out_dir: Path, cache_dir: Path, *overrides: str, hydra: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("generate", [*TINY, f"out_dir={out_dir}", f"cache_dir={cache_dir}", *overrides],
                       return_hydra_config=hydra)


def test_cli_writes_shards_webdataset_reads_and_the_resolved_config(tmp_path):
    out_dir = tmp_path / "run"
    command = [sys.executable, "generate.py", *TINY, "filters=default", "num_pairs=3", "shard_size=2", "batch_size=2",
               f"out_dir={out_dir}", f"cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pairs written        3 of 3 samples" in done.stdout

    dataset = wds.WebDataset(str(out_dir / "shards" / "pairs-{000000..000001}.tar"), shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    bank = set(load_sentences("cat"))
    for index, sample in enumerate(samples):
        assert sample["input.png"].size == sample["edited.png"].size == (64, 64)
        meta = sample["json"]
        assert set(meta) == SAMPLE_KEYS
        assert (meta["index"], meta["seed"], meta["task"], meta["model"]) == (index, index, "cat2dog", "tiny")
        assert meta["prompt"] in bank
        assert set(meta["scores"]) >= {"clip_gain", "seg_iou"}  # filters=default scores while generating
    saved = OmegaConf.load(out_dir / "config.yaml")
    assert (saved.num_pairs, saved.shard_size, saved.model.name, saved.editor.num_inference_steps) == (3, 2, "tiny", 1)
    assert verify_run(out_dir).ok


def test_unknown_task_is_one_line_naming_the_choices(tmp_path):
    done = subprocess.run([sys.executable, "generate.py", "task=cat2doge", f"out_dir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: unknown task 'cat2doge' (choose from: ")
    assert "cat2dog, " in done.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("overrides, message", [
    (["num_pairs=0"], "num_pairs must be positive, got 0"),
    (["num_pairs=null"], "this source has no fixed size: set num_pairs=N"),
    (["num_pairs=2", "task.source_bank=no_such_bank"], "no bundled sentence bank 'no_such_bank'"),
    (["source=folder", "source.path=EMPTY"], "no images (.jpg, .jpeg, .png, .webp, .bmp) under"),
    (["source=folder"], "the source needs source.path=..."),
    (["source=folder", "source.path=EMPTY/none"], "source.path is not a folder"),
    (["num_pairs=2", "worker.rank=2", "worker.count=2"], "worker.rank must be in [0, worker.count), got rank=2, count=2"),
    (["num_pairs=2", "worker.rank=0"], "set both worker.rank and worker.count, or neither"),
])
def test_config_errors_are_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, overrides, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr("datagen.job.load_backbone", no_model)
    (tmp_path / "empty").mkdir()
    overrides = [o.replace("EMPTY", str(tmp_path / "empty")) for o in overrides]
    assert launch.main(generate_config(tmp_path / "run", tmp_path / "cache", *overrides)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error
    assert not (tmp_path / "run").exists()


def write_img2dataset_shard(path: Path, samples: list[tuple[str, str, bytes, str | None]]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for key, ext, image, caption in samples:
            sink.write({"__key__": key, ext: image, "json": b"{}", **({"txt": caption} if caption else {})})


def encoded(color, size=(96, 64), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def test_shards_source_reads_img2dataset_output_in_order_with_captions(tmp_path):
    shards = tmp_path / "laion"
    shards.mkdir()
    write_img2dataset_shard(shards / "00000.tar", [("000000000", "jpg", encoded((255, 0, 0)), "a red square"),
                                                   ("000000001", "jpg", b"\xff\xd8 not really a jpeg", "broken")])
    write_img2dataset_shard(shards / "00001.tar", [("000000002", "png", encoded((0, 0, 255), fmt="PNG"), None)])
    cfg = generate_config(tmp_path / "run", tmp_path / "cache", "source=shards", f"source.urls={shards}")
    job = plan_job(cfg)
    assert job.total == 3  # num_pairs: null takes every input found
    red, blue = job.source[0], job.source[2]
    assert (red.prompt, red.meta["source"], blue.prompt, blue.meta["source"]) == (
        "a red square", "00000.tar/000000000", None, "00001.tar/000000002")
    assert red.image.shape == (3, 64, 64) and red.seed == 0 and blue.seed == 2
    assert torch.allclose(blue.image.mean((1, 2)), torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(InputRejected) as rejected:
        job.source[1]
    assert rejected.value.reason == "unreadable" and rejected.value.detail.startswith("00000.tar/000000001: ")
    braced = plan_job(generate_config(tmp_path / "run", tmp_path / "cache", "source=shards",
                                      f"source.urls='{shards}/{{00000..00001}}.tar'"))
    assert [e.key for e in braced.source.entries] == [e.key for e in job.source.entries]
    with tarfile.open(shards / "00000.tar") as tar:  # the index points at the members' bytes
        assert tar.extractfile("000000000.jpg").read() == job.source.read(0)[1]


def test_fit_rules_center_crop_resize_and_pad():
    halves = Image.new("RGB", (128, 64), (255, 0, 0))
    halves.paste((0, 0, 255), (64, 0, 128, 64))  # red left half, blue right half
    crop = fit_image(halves, 32, "center_crop")  # scaled to 64 x 32, centre 32 columns: 16 red, 16 blue
    assert torch.equal(crop[:, :, :15].mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(crop[:, :, 17:].mean((1, 2)), torch.tensor([0.0, 0.0, 1.0]))
    squashed = fit_image(halves, 32, "resize")
    assert squashed.shape == (3, 32, 32) and torch.equal(squashed[:, :, :15].mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]))
    padded = fit_image(halves, 32, "pad")  # scaled to 32 x 16, 8 black rows above and below
    assert torch.equal(padded[:, :8], torch.zeros(3, 8, 32)) and torch.equal(padded[:, 24:], torch.zeros(3, 8, 32))
    assert torch.equal(padded[:, 8:24, :15].mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("env, place", [
    ({}, LauncherPlace(0, 1, None)),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, LauncherPlace(5, 8, 1)),  # torchrun
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_LOCALID": "0"},
     LauncherPlace(1, 2, None)),  # srun, one task per node: the task spreads over its node's GPUs
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4",
      "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2(x1)", "SLURM_LOCALID": "1"},
     LauncherPlace(5, 8, 1)),  # array element 2 of 4, task 1 of 2, one task per GPU
])
def test_launcher_place_from_environment(env, place):
    assert launcher_place(env) == place


def test_worker_slots_one_per_gpu_numbered_across_processes():
    unset = {"rank": None, "count": None}
    array = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert worker_slots(unset, "auto", "auto", array, num_gpus=4) == [
        WorkerSlot(4 + g, 12, f"cuda:{g}") for g in range(4)]
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert worker_slots(unset, "auto", "auto", torchrun, num_gpus=4) == [WorkerSlot(5, 8, "cuda:1")]
    assert worker_slots({"rank": 1, "count": 2}, "auto", "auto", torchrun, num_gpus=2) == [  # the config wins
        WorkerSlot(2, 4, "cuda:0"), WorkerSlot(3, 4, "cuda:1")]
    assert worker_slots(unset, "auto", "auto", {}, num_gpus=0) == [WorkerSlot(0, 1, "cpu")]
    assert worker_slots(unset, "auto", "cuda:1", {}, num_gpus=4) == [WorkerSlot(0, 1, "cuda:1")]  # one named device
    assert worker_slots(unset, 2, "cpu", {}, num_gpus=0) == [WorkerSlot(0, 2, "cpu"), WorkerSlot(1, 2, "cpu")]


def test_slurm_launcher_preset_makes_the_sbatch_script_it_documents(tmp_path, monkeypatch):
    """Every key of conf/hydra/launcher/slurm.yaml is one submitit takes (it raises on others), and the sbatch
    header asks for one 8-GPU task per node. A stand-in `srun` on PATH is all submitit needs to build it."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = generate_config(tmp_path / "run", tmp_path / "cache", "hydra/launcher=slurm", hydra=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params.pop("_target_") == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    params["name"] = params["name"].replace("${task.name}", cfg.task.name)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    # as the plugin's launch(): max_num_timeout goes to the executor, queue keys other than the base ones get "slurm_"
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    del params["submitit_folder"]
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in base else f"slurm_{key}": value for key, value in params.items()})
    sbatch = executor._executor._make_submission_file_text("python generate.py", "uid")
    for line in ("--gpus-per-node=8", "--ntasks-per-node=1", "--nodes=1", "--cpus-per-task=32", "--time=1440",
                 "--job-name=pairforge-cat2dog", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in sbatch


def test_a_configured_caption_wins_over_sidecars(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encoded((255, 0, 0), fmt="PNG"))
    (images / "a.txt").write_text("a red square")
    (images / "b.png").write_bytes(encoded((0, 255, 0), fmt="PNG"))
    sidecar = plan_job(generate_config(tmp_path / "run", tmp_path / "cache", "source=folder", f"source.path={images}"))
    assert [sidecar.source[i].prompt for i in range(2)] == ["a red square", None]  # None: BLIP captions it
    fixed = plan_job(generate_config(tmp_path / "run2", tmp_path / "cache", "source=folder", f"source.path={images}",
                                     "source.caption='a photo of a cat'"))
    assert [fixed.source[i].prompt for i in range(2)] == ["a photo of a cat"] * 2


def test_the_summary_names_gpu_memory_only_when_a_gpu_measured_it():
    summary = Summary(shards_done=1, shards_total=1, pairs_total=2, written=2, rejected={}, seconds_per_pair=1.0,
                      unet_evals_per_pair=30, peak_gpu_memory_gb=0.0)   # what CPU shards record
    assert "GPU" not in summary.table()
    assert "peak GPU memory      1.50 GiB" in dataclasses.replace(summary, peak_gpu_memory_gb=1.5).table()


def test_workers_load_models_without_the_libraries_bars_but_keep_the_download_bars(tmp_path, capfd):
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8)
    transformers.CLIPTextModel(config).save_pretrained(tmp_path / "text_encoder")
    shown = transformers.utils.logging.is_progress_bar_enabled(), diffusers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()
    try:
        transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
        assert "Loading weights" in capfd.readouterr().err   # what each of a worker's components printed
        hide_loading_bars()
        transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
        assert "Loading weights" not in capfd.readouterr().err
        assert not diffusers.utils.logging.is_progress_bar_enabled()
        assert not huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        for library, enabled in zip((transformers, diffusers), shown):
            (library.utils.logging.enable_progress_bar if enabled else library.utils.logging.disable_progress_bar)()
