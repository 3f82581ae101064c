"""Export of the EMA generator (distill/export.py, export.py): the file equals the eager generator, in this
process and in a fresh one that cannot import the project; metadata; fp16; refusal of bad files; ONNX."""
import argparse
import copy
import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from bench.latency import build_generator
from distill.export import CheckpointError, ExportError, ParityError, config_sha256, export, save_onnx
from distill.module import DistillModule

REPO = Path(__file__).resolve().parents[1]
GENERATOR = {"_target_": "models.comodgan.Generator", "resolution": 16, "channel_base": 256, "channel_max": 16,
             "z_dim": 8, "w_dim": 8, "code_dim": 16, "mapping_layers": 2}
RUN_CONFIG = {"seed": 0, "task": {"name": "cat2dog", "thresholds": {"seg_iou": 0.7}}, "distill": {"generator": GENERATOR}}
export_cli = importlib.util.module_from_spec(importlib.util.spec_from_file_location("export_cli", REPO / "export.py"))
export_cli.__spec__.loader.exec_module(export_cli)


def write_run(run: Path, module: DistillModule) -> Path:
    """RUN/config.yaml and RUN/checkpoints/last.ckpt in the layout train.py writes (what Lightning saves of it)."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    checkpoint = {"epoch": 0, "global_step": 12, "pytorch-lightning_version": "2.6.6", "state_dict": module.state_dict(),
                  "hparams_name": "kwargs", "hyper_parameters": dict(module.hparams), "optimizer_states": []}
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def module() -> DistillModule:
    """A DistillModule whose G_ema differs from G (as after training) and whose w_avg is not zero."""
    torch.manual_seed(0)
    module = DistillModule(generator=GENERATOR, adversarial_weight=0.0, lpips_pretrained_vgg=False)
    with torch.no_grad():
        for param in module.G_ema.parameters():
            param.add_(0.1 * torch.randn_like(param))
        module.G_ema.w_avg.normal_()
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory, module):
    run = tmp_path_factory.mktemp("run")
    ckpt = write_run(run, module)
    return ckpt, export(ckpt, run / "generator.ts", device="cpu")


def inputs(batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_export_equals_the_eager_ema_generator_and_carries_its_metadata(exported, module):
    _, report = exported
    files = {"pairforge.json": ""}
    loaded = torch.jit.load(str(report.path), _extra_files=files)
    meta = json.loads(files["pairforge.json"])
    x = inputs()
    with torch.no_grad():
        expected = module.G_ema.eval()(x)
        for _ in range(3):  # the profiled first call, then the optimised graph translate.py runs after its warm-up
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)
        assert (module.G.eval()(x) - expected).abs().max() > 0.1  # it is G_ema that was exported, not G
    assert report.max_abs_diff <= 1e-5
    assert not loaded.training and loaded(x).shape == (3, 3, 16, 16)
    assert meta["resolution"] == 16 and meta["dtype"] == "float32" and meta["channels"] == "RGB"
    assert meta["input_range"] == meta["output_range"] == [-1.0, 1.0]
    assert meta["task"] == "cat2dog" and meta["checkpoint"] == {"file": "last.ckpt", "global_step": 12}
    assert meta["training_config"] == RUN_CONFIG
    assert meta["training_config_sha256"] == config_sha256(RUN_CONFIG)
    assert meta["generator"] == {k: v for k, v in GENERATOR.items() if k != "_target_"}
    assert not list(report.path.parent.glob("*.partial"))


def test_config_hash_ignores_key_order_and_sees_every_value():
    reordered = {"distill": RUN_CONFIG["distill"], "task": {"thresholds": {"seg_iou": 0.7}, "name": "cat2dog"}, "seed": 0}
    changed = {**RUN_CONFIG, "task": {"name": "cat2dog", "thresholds": {"seg_iou": 0.71}}}
    assert config_sha256(reordered) == config_sha256(RUN_CONFIG) != config_sha256(changed)


FRESH_PROCESS = """
import importlib.util, json, os, runpy, sys, torch
assert sys.argv[1] not in [os.path.abspath(entry) for entry in sys.path], sys.path
assert all(importlib.util.find_spec(name) is None for name in ("models", "distill", "datagen")), "project importable"
files = {"pairforge.json": ""}
model = torch.jit.load("generator.ts", _extra_files=files)
torch.save({"output": model(torch.load("input.pt")), "meta": json.loads(files["pairforge.json"])}, "output.pt")
sys.argv = ["translate.py", "model=generator.ts", "input=images", "output=translated"]
runpy.run_path("translate.py", run_name="__main__")
"""


def test_exported_file_and_translate_run_in_a_fresh_process_without_the_project(exported, module, tmp_path):
    _, report = exported
    (tmp_path / "generator.ts").write_bytes(report.path.read_bytes())
    (tmp_path / "translate.py").write_bytes((REPO / "translate.py").read_bytes())
    x = inputs()
    torch.save(x, tmp_path / "input.pt")
    image = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    (tmp_path / "images").mkdir()
    Image.fromarray(image.numpy()).save(tmp_path / "images" / "one.png")
    # -S: no site processing, so no .pth file and no editable install of pairforge; torch from site-packages only
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": sysconfig.get_paths()["purelib"]}
    done = subprocess.run([sys.executable, "-S", "-c", FRESH_PROCESS, str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    result = torch.load(tmp_path / "output.pt")
    with torch.no_grad():
        torch.testing.assert_close(result["output"], module.G_ema.eval()(x), rtol=0, atol=1e-5)  # its own thread count
        expected = (module.G_ema(image.permute(2, 0, 1)[None].float() / 255 * 2 - 1)[0] + 1) / 2 * 255
    assert result["meta"]["resolution"] == 16
    # translate.py on an image at the model's resolution: exactly the generator's output, quantised to 8 bits
    translated = torch.from_numpy(np.asarray(Image.open(tmp_path / "translated" / "one.png")))
    assert (translated.permute(2, 0, 1).float() - expected).abs().max() <= 0.5 + 1e-3
    assert "images/s" in done.stdout


def test_fp16_export_and_a_checkpoint_outside_its_run(module, tmp_path):
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3}
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    report = export(tmp_path / "moved.ckpt", tmp_path / "generator16.pt", dtype="float16", device="cpu")
    loaded = torch.jit.load(str(report.path))
    x = inputs()
    with torch.no_grad():
        output = loaded(x.half())
        difference = (output.float() - module.G_ema.eval()(x)).abs().max().item()
    print(f"fp16 file vs fp32 eager: max abs difference {difference:.2e} (the export's check: "
          f"{report.fp32_max_abs_diff:.2e})")
    assert output.dtype == torch.float16 and all(p.dtype == torch.float16 for p in loaded.parameters())
    assert 0 < difference < 2e-2 and 0 < report.fp32_max_abs_diff < 2e-2
    assert report.metadata["dtype"] == "float16" and report.metadata["task"] is None
    # no RUN/config.yaml beside it: the module's hyper-parameters are what is hashed
    assert report.metadata["training_config_sha256"] == config_sha256(dict(module.hparams))
    assert "hyper_parameters" in report.metadata["training_config_source"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=auto picks the GPU here")
def test_fp16_without_a_gpu_needs_an_explicit_cpu_device(exported, tmp_path):
    ckpt, _ = exported
    with pytest.raises(ExportError, match="dtype=float16 is for GPUs.*pass device=cpu"):
        export(ckpt, tmp_path / "generator16.ts", dtype="float16")
    assert not list(tmp_path.iterdir())


def test_a_file_that_fails_parity_is_not_written(exported, monkeypatch, tmp_path):
    ckpt, _ = exported
    out = tmp_path / "generator.ts"
    out.write_bytes(b"an older export")
    script = torch.jit.script

    def script_off_by_a_little(generator):
        scripted = script(copy.deepcopy(generator))  # a scripted module shares the eager one's parameters
        with torch.no_grad():
            scripted.decoder.to_rgb.bias.add_(1e-4)  # below what a visual check would notice
        return scripted

    monkeypatch.setattr(torch.jit, "script", script_off_by_a_little)
    with pytest.raises(ParityError, match=rf"differs from the eager generator by 0.0001 .*{out} not written"):
        export(ckpt, out, device="cpu")
    assert out.read_bytes() == b"an older export" and sorted(p.name for p in tmp_path.iterdir()) == ["generator.ts"]


def test_an_fp16_file_far_from_the_fp32_generator_is_not_written(module, tmp_path):
    """A generator half precision cannot hold: 1000 added by one toRGB and taken away by the next leaves fp16 a
    step of 0.5 for the image. The fp16 file computes what the eager fp16 generator does, and is still refused."""
    broken = copy.deepcopy(module)
    with torch.no_grad():
        broken.G_ema.decoder.blocks[-2].to_rgb.bias.add_(1000.0)
        broken.G_ema.decoder.blocks[-1].to_rgb.bias.sub_(1000.0)
    torch.save({"state_dict": broken.state_dict(), "hyper_parameters": dict(broken.hparams)}, tmp_path / "broken.ckpt")
    out = tmp_path / "generator16.ts"
    with pytest.raises(ParityError, match=rf"float16 TorchScript file differs from the float32 eager generator by .*{out} not written"):
        export(tmp_path / "broken.ckpt", out, dtype="float16", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ckpt"]


def test_the_optimised_graph_is_checked_not_only_the_first_call(exported, monkeypatch, tmp_path):
    """TorchScript's profiling executor runs the first call as scripted and later ones on an optimised graph (fused
    on a GPU): a file whose optimised graph is off is refused, though its first call is exact."""
    ckpt, _ = exported
    load = torch.jit.load

    def optimised_off_by_a_little(*args, **kwargs):
        model, calls = load(*args, **kwargs), itertools.count()
        return lambda x: model(x) + (1e-4 if next(calls) else 0.0)

    monkeypatch.setattr(torch.jit, "load", optimised_off_by_a_little)
    out = tmp_path / "generator.ts"
    with pytest.raises(ParityError, match=rf"differs from the eager generator by 0.0001 .*{out} not written"):
        export(ckpt, out, device="cpu")
    assert not out.exists()


def write_bad_checkpoint(kind: str, path: Path, exported) -> Path:
    ckpt, report = exported
    good = torch.load(ckpt, weights_only=True)
    if kind == "truncated":
        data = ckpt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "image":
        Image.new("RGB", (4, 4)).save(path, format="PNG")
    elif kind == "other zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "a zip, but no torch.save archive")
    elif kind == "torchscript":
        path.write_bytes(report.path.read_bytes())
    elif kind == "pickled object":
        torch.save({"state_dict": good["state_dict"], "args": argparse.Namespace(lr=1e-3)}, path)
    elif kind == "bare state dict":
        torch.save(good["state_dict"], path)
    elif kind == "another generator class":
        torch.save({**good, "hyper_parameters": {"generator": {**GENERATOR, "_target_": "os.system"}}}, path)
    elif kind == "weights of another size":
        torch.save({**good, "hyper_parameters": {"generator": {**GENERATOR, "channel_max": 32}}}, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"),
    ("truncated", "is truncated or corrupt"),
    ("image", "is not a torch checkpoint"),
    ("other zip", "is not a torch checkpoint"),
    ("torchscript", "is not a torch checkpoint but a TorchScript file"),
    ("pickled object", r"holds objects other than tensors .*argparse.Namespace.*weights_only=True"),
    ("bare state dict", "is not a pairforge distillation checkpoint"),
    ("another generator class", "is from another architecture: its generator is 'os.system'"),
    ("weights of another size", r"is from another architecture: its G_ema weights do not fit .*size mismatch"),
])
def test_bad_checkpoints_are_rejected_with_the_documented_message(kind, message, exported, tmp_path):
    path = write_bad_checkpoint(kind, tmp_path / "bad.ckpt", exported)
    with pytest.raises(CheckpointError, match=message) as error:
        export(path, tmp_path / "generator.ts", device="cpu")
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    assert not (tmp_path / "generator.ts").exists()


def test_cli_reports_a_bad_checkpoint_in_one_line(exported, tmp_path, caplog):
    bad = write_bad_checkpoint("truncated", tmp_path / "last.ckpt", exported)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt={bad}", f"out={tmp_path / 'g.ts'}"])
    with pytest.raises(SystemExit) as exit:
        export_cli.main.__wrapped__(cfg)  # the body under @hydra.main
    assert exit.value.code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"{bad} is truncated or corrupt")


needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                                reason="needs onnx, onnxscript and onnxruntime")


@needs_onnx
def test_onnx_export_matches_under_onnxruntime(exported, tmp_path):
    ckpt, _ = exported
    report = export(ckpt, tmp_path / "generator.ts", device="cpu", onnx=tmp_path / "generator.onnx")
    assert report.onnx_max_abs_diff is not None and report.onnx_max_abs_diff <= 1e-5
    import onnxruntime
    session = onnxruntime.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"])
    x = inputs(batch=5)  # a batch size other than the export's: the batch axis is dynamic
    (output,) = session.run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), torch.jit.load(str(report.path))(x), rtol=0, atol=1e-5)


@needs_onnx
def test_the_paper_size_generator_exports_to_onnx(tmp_path):
    """onnxruntime's kernels sum in another order than torch's: at 256 px they differ by ~2.5e-5, over the
    TorchScript check's 1e-5, which refused this export until the ONNX check got its own tolerance."""
    generator = build_generator("comodgan_256", grouped_modconv=False)
    difference = save_onnx(generator, tmp_path / "generator.onnx", torch.float32, torch.device("cpu"))
    # this test's bound, not the code's: 4x the measured difference, 1/80 of one 8-bit level (2/255 in [-1, 1])
    assert (tmp_path / "generator.onnx").is_file() and difference <= 1e-4


def test_onnx_without_its_packages_is_refused_before_any_work(exported, tmp_path, monkeypatch):
    ckpt, _ = exported
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "onnxscript" else find_spec(name, *args))
    with pytest.raises(ExportError, match="ONNX export needs .*onnxscript.*pip install"):
        export(ckpt, tmp_path / "generator.ts", device="cpu", onnx=tmp_path / "generator.onnx")
    assert not list(tmp_path.iterdir())
