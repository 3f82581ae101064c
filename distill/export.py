"""Export of the distilled EMA generator: a TorchScript file that needs nothing but torch.

    python export.py ckpt=RUN/checkpoints/last.ckpt out=generator.ts [dtype=float16] [onnx=generator.onnx]

The file holds the scripted ``Generator`` in eval mode (deterministic: no dropout, no noise,
``w = w_avg``), called as ``model(image)`` with ``image`` a float ``B x 3 x R x R`` tensor in
[-1, 1] (R = ``resolution``) and returning the same shape in [-1, 1]. What a caller needs is stored
in the file as the TorchScript extra file ``pairforge.json`` (readable from C++ through
``torch::jit::load(path, device, extra_files)`` too):

    files = {"pairforge.json": ""}
    model = torch.jit.load("generator.ts", map_location="cpu", _extra_files=files)
    meta = json.loads(files["pairforge.json"])   # resolution, input_range, dtype, task, ...

Keys: ``resolution``, ``dtype``, ``channels`` ("RGB"), ``input_range`` / ``output_range`` (the
generator's [-1, 1]; an RGB value ``v`` in [0, 1] is ``lo + v * (hi - lo)``), ``normalisation``
(the same in words), ``task``, ``training_config_sha256`` (SHA-256 of the resolved training config
as canonical JSON) with ``training_config_source`` and the config itself as ``training_config``,
``generator`` (its constructor arguments), ``checkpoint`` (file name and ``global_step``) and the
``torch_version`` that wrote the file.

Nothing is written unless it works: the file is saved under a temporary name, loaded back
(``torch.jit.load``, so exactly what a user gets) and compared with the eager EMA generator on
random inputs on ``device``, over ``PARITY_CALLS`` calls: TorchScript's profiling executor runs the
first call as scripted and the later ones on a graph optimised from its profile (fused on a GPU), and
those are what ``translate.py`` runs after its warm-up. A maximum absolute difference above
``PARITY_TOLERANCE`` (fp32: 1e-5) deletes it and raises ``ParityError``. fp16 files are compared with
the eager generator in fp16 (tolerance 2e-2) and, to bound what half precision loses, with the eager
generator in fp32 (``FP16_LOSS_TOLERANCE``, 0.05: 6 of 255 levels of an 8-bit output; random-weight
16 to 64 px generators lose 0.004 to 0.014 on a CPU). They are checked on a GPU: torch's CPU
half-precision convolutions are so slow that ``device=auto`` without CUDA refuses ``dtype=float16``
(an explicit ``device=cpu`` waits for it).
An ONNX copy (opset ``ONNX_OPSET``, dynamic batch) is checked the same way with onnxruntime when
it is installed, within ``ONNX_TOLERANCE`` (fp32: 1e-4): another runtime's kernels sum in another order.

Checkpoints are read with ``torch.load(weights_only=True)``: only tensors and plain containers,
never arbitrary pickled objects. The generator is rebuilt from the checkpoint's
``hyper_parameters["generator"]`` only if its ``_target_`` is ``models.comodgan.Generator``
(instantiating any other class named by a file would run code the file chose). Every problem
with the checkpoint is a ``CheckpointError`` whose message starts with the path and then says:

    "no such file"                                   missing
    "is truncated or corrupt"                        not a complete torch archive
    "is not a torch checkpoint"                      some other file (an image, text, TorchScript)
    "holds objects other than tensors"               a pickle weights_only=True refuses
    "is not a pairforge distillation checkpoint"     no G_ema weights / generator config
    "is from another architecture"                   another generator class, or weights that
                                                     do not fit the generator config
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from textwrap import shorten

import torch
from omegaconf import OmegaConf
from torch import Tensor

from models.comodgan import Generator

GENERATOR_TARGET = "models.comodgan.Generator"
EMA_PREFIX = "G_ema."
METADATA_FILE = "pairforge.json"
VALUE_RANGE = (-1.0, 1.0)
PARITY_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2}
FP16_LOSS_TOLERANCE = 0.05   # an fp16 file against the fp32 eager generator
PARITY_CALLS = 3             # the profiled first call, then two on the optimised graph
# onnxruntime's convolutions are not torch's: the paper-size generators (256, 512 px) differ by 2.5e-5 in fp32
ONNX_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}
ONNX_OPSET = 18
DTYPES = {"float32": torch.float32, "float16": torch.float16}

# TorchScript is what this export promises (libtorch loads it); torch 2.14's notice that it is deprecated is noise here
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)


class ExportError(Exception):
    """Nothing was exported; the message says why in one line."""


class CheckpointError(ExportError):
    """The checkpoint cannot be exported; the message names the file and the reason."""


class ParityError(ExportError):
    """The exported file does not compute what the eager generator computes; nothing was written."""


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float
    metadata: dict
    fp32_max_abs_diff: float | None = None   # fp16 files: to the eager generator in fp32 (None for fp32 files)
    onnx_path: Path | None = None
    onnx_max_abs_diff: float | None = None   # None: onnxruntime is not installed, no check was run


def read_checkpoint(path: str | os.PathLike) -> dict:
    """`torch.load(path, weights_only=True)`, with every failure turned into one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (train one with `python train.py ... out_dir=RUN`; "
                              f"its checkpoints are RUN/checkpoints/*.ckpt)")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(2) == b"PK":  # a zip whose central directory (written last) is missing
                raise CheckpointError(f"{path} is truncated or corrupt (an incomplete torch archive); "
                                      f"was it copied or written to the end?")
        raise CheckpointError(f"{path} is not a torch checkpoint (a checkpoint is a zip archive written by torch.save)")
    with zipfile.ZipFile(path) as archive:
        names = {Path(name).name for name in archive.namelist()}
    if "constants.pkl" in names:
        raise CheckpointError(f"{path} is not a torch checkpoint but a TorchScript file: it is already exported")
    if "data.pkl" not in names:
        raise CheckpointError(f"{path} is not a torch checkpoint (a zip archive, but not one written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # what weights_only=True raises on anything but plain data
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise CheckpointError(f"{path} holds objects other than tensors and plain containers"
                              + (f" ({culprit[1]})" if culprit else "")
                              + "; refusing to unpickle it (weights_only=True)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({str(error).splitlines()[0]})") from None


def load_ema_generator(checkpoint: dict, path: str | os.PathLike) -> Generator:
    """The EMA generator of a distillation checkpoint (layout: `distill/module.py`), in eval mode."""
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}  # torch.save can store any plain value
    config = (checkpoint.get("hyper_parameters") or {}).get("generator")
    weights = {k.removeprefix(EMA_PREFIX): v for k, v in (checkpoint.get("state_dict") or {}).items()
               if k.startswith(EMA_PREFIX)}
    if not weights or not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a pairforge distillation checkpoint: it lacks the EMA generator "
                              f"(state_dict['G_ema.*'] and hyper_parameters['generator'])")
    arguments = dict(config)
    target = arguments.pop("_target_", None)
    if target != GENERATOR_TARGET:
        raise CheckpointError(f"{path} is from another architecture: its generator is {target!r}, "
                              f"this export knows {GENERATOR_TARGET!r}")
    try:
        generator = Generator(**arguments)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is from another architecture: the Co-Mod-GAN generator does not take "
                              f"its config {arguments} ({error})") from None
    try:
        generator.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip()  # torch lists one problem per line below a header
        raise CheckpointError(f"{path} is from another architecture: its G_ema weights do not fit the generator "
                              f"config {arguments} ({shorten(first, 300)})") from None
    return generator.eval().requires_grad_(False)


def config_sha256(config: dict) -> str:
    """SHA-256 of a resolved config as canonical JSON: equal configs hash equally whatever their key order."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def training_config(checkpoint: dict, path: Path) -> tuple[dict, str]:
    """The resolved training config and where it came from.

    `train.py` saves it as RUN/config.yaml beside RUN/checkpoints/; a checkpoint moved away from its
    run falls back to the module's hyper-parameters (the `distill` part of the config).
    """
    run_config = path.resolve().parent.parent / "config.yaml"
    if run_config.is_file():
        return OmegaConf.to_container(OmegaConf.load(run_config), resolve=True), str(run_config)
    return checkpoint["hyper_parameters"], "checkpoint hyper_parameters (the distill config only)"


def trained_task(config: dict) -> str | None:
    """The task's name from the training config, else from the generation run the pairs came from."""
    if (config.get("task") or {}).get("name"):
        return config["task"]["name"]
    data_path = (config.get("data") or {}).get("path")
    generation_config = Path(str(data_path)) / "config.yaml" if isinstance(data_path, str) else None
    if generation_config is not None and generation_config.is_file():
        return (OmegaConf.load(generation_config).get("task") or {}).get("name")
    return None


def describe(checkpoint: dict, path: Path, generator: Generator, dtype: torch.dtype, task: str | None) -> dict:
    """The metadata stored in the exported file (keys documented in the module doc), as JSON reads it back."""
    config, source = training_config(checkpoint, path)
    arguments = {k: v for k, v in checkpoint["hyper_parameters"]["generator"].items() if k != "_target_"}
    metadata = {
        "format": "pairforge.translator/1",
        "resolution": generator.resolution,
        "dtype": str(dtype).removeprefix("torch."),
        "channels": "RGB",
        "layout": "B x 3 x resolution x resolution, float, contiguous or channels_last",
        "input_range": list(VALUE_RANGE),
        "output_range": list(VALUE_RANGE),
        "normalisation": "input = 2 * rgb - 1 for RGB values rgb in [0, 1]; rgb = (output + 1) / 2",
        "task": task or trained_task(config),
        "training_config_sha256": config_sha256(config),
        "training_config_source": source,
        "training_config": config,
        "generator": arguments,
        "checkpoint": {"file": path.name, "global_step": checkpoint.get("global_step")},
        "torch_version": torch.__version__,
    }
    return json.loads(json.dumps(metadata, default=str))  # tuples become lists, as in the file


def parity_inputs(resolution: int, batch: int, device: torch.device, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_parity(name: str, difference: float, dtype: torch.dtype, out: Path,
                 tolerances: dict[torch.dtype, float] = PARITY_TOLERANCE) -> None:
    if not difference <= tolerances[dtype]:  # also catches NaN
        raise ParityError(f"{name} differs from the eager generator by {difference:.3g} (max abs, "
                          f"{str(dtype).removeprefix('torch.')}; allowed {tolerances[dtype]:g}): "
                          f"{out} not written")


@torch.no_grad()
def save_torchscript(generator: Generator, out: Path, metadata: dict, device: torch.device,
                     dtype: torch.dtype, batch: int = 2) -> tuple[float, float | None]:
    """Script `generator`, save it with `metadata`, and keep the file only if it loads back equal.

    Returns the file's max abs difference to the eager generator in `dtype` and, for fp16, in fp32."""
    x = parity_inputs(generator.resolution, batch, device)
    full_precision = generator.to(device, torch.float32)(x) if dtype != torch.float32 else None
    generator = generator.to(device, dtype)
    x = x.to(dtype)
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.jit.save(torch.jit.script(generator), str(partial), _extra_files={METADATA_FILE: json.dumps(metadata)})
        files = {METADATA_FILE: ""}
        loaded = torch.jit.load(str(partial), map_location=device, _extra_files=files)
        if json.loads(files[METADATA_FILE]) != metadata:
            raise ParityError(f"the metadata read back from the TorchScript file differs: {out} not written")
        expected = generator(x)
        outputs = [loaded(x) for _ in range(PARITY_CALLS)]
        difference = max(max_abs_diff(output, expected) for output in outputs)
        check_parity("the TorchScript file", difference, dtype, out)
        loss = None if full_precision is None else max(max_abs_diff(output, full_precision) for output in outputs)
        if loss is not None and not loss <= FP16_LOSS_TOLERANCE:
            raise ParityError(f"the {str(dtype).removeprefix('torch.')} TorchScript file differs from the float32 "
                              f"eager generator by {loss:.3g} (max abs; allowed {FP16_LOSS_TOLERANCE:g}): this "
                              f"generator does not fit half precision; {out} not written (export float32)")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return difference, loss


@torch.no_grad()
def save_onnx(generator: Generator, out: Path, dtype: torch.dtype, device: torch.device,
              batch: int = 2) -> float | None:
    """ONNX (opset ONNX_OPSET, batch axis dynamic); checked with onnxruntime when installed, else None."""
    generator = generator.to(device, dtype)
    x = parity_inputs(generator.resolution, batch, device).to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.onnx")
    try:
        program = torch.onnx.export(generator, (x,), input_names=["image"], output_names=["output"],
                                    opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(partial))
        difference = None
        try:
            import onnxruntime
        except ImportError:
            pass
        else:
            session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
            (output,) = session.run(None, {"image": x.cpu().numpy()})
            difference = max_abs_diff(torch.from_numpy(output), generator(x).cpu())
            check_parity("the ONNX file (onnxruntime, CPU)", difference, dtype, out, ONNX_TOLERANCE)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return difference


def require_onnx_exporter() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)} (pip install onnx onnxscript onnxruntime, "
                           f"or pairforge[onnx]); or leave out onnx=")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"device={device}, but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(device)


def export(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32", device: str = "auto",
           onnx: str | os.PathLike | None = None, task: str | None = None) -> ExportReport:
    """Export the EMA generator of `ckpt` to the TorchScript file `out` (and `onnx`), parity-checked."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype}: choose one of {', '.join(DTYPES)}")
    torch_dtype, torch_device = DTYPES[dtype], resolve_device(device)
    if torch_dtype == torch.float16 and torch_device.type == "cpu" and device == "auto":
        raise ExportError("dtype=float16 is for GPUs, and its parity check runs in half precision, which torch's "
                          "CPU convolutions do very slowly (over a minute per 3x3 convolution at 256 px); export "
                          "where CUDA is available, or pass device=cpu to wait for it")
    if onnx is not None:
        require_onnx_exporter()
    if torch_device.type == "cuda":  # fp32 parity to 1e-5 needs full-precision matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ckpt = Path(ckpt)
    checkpoint = read_checkpoint(ckpt)
    generator = load_ema_generator(checkpoint, ckpt)
    metadata = describe(checkpoint, ckpt, generator, torch_dtype, task)
    difference, fp32_difference = save_torchscript(generator, Path(out), metadata, torch_device, torch_dtype)
    report = ExportReport(Path(out), difference, metadata, fp32_difference)
    if onnx is not None:
        report.onnx_path = Path(onnx)
        report.onnx_max_abs_diff = save_onnx(generator, Path(onnx), torch_dtype, torch_device)
    return report

