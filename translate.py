"""python translate.py model=generator.ts input=PATH output=DIR [device=auto|cpu|cuda] [batch_size=8] [video=auto]

Runs an exported translator (`python export.py ...`) on one image, a folder of images (searched
recursively) or a video, and writes one output per input under DIR with the input's relative path,
name and size. Prints the throughput in images/s at the end.

This file is also the reference for using an exported model from your own code: it needs only
torch, torchvision (resizing), PIL (image files) and, for videos, PyAV; nothing from pairforge.

    files = {"pairforge.json": ""}
    model = torch.jit.load("generator.ts", map_location="cuda", _extra_files=files)
    meta = json.loads(files["pairforge.json"])      # resolution, dtype, input_range, output_range, ...

Size rule: every image is squashed (resized without keeping its aspect ratio, bilinear with
antialiasing) to the model's resolution x resolution, translated, and resized back to its own
height x width. Squashing, unlike a centre crop, keeps every pixel in view, so each output pixel
comes from the matching input pixel and nothing has to be pasted back unedited; unlike letterboxing,
it feeds the model no padding bars (which it never saw in training) and spends all of its
resolution on the image. The cost: a non-square image is seen stretched, so for strongly
elongated inputs crop them to near-square first. Alpha channels are dropped (RGB in, RGB out).
A float16 model runs in float32 on a CPU, where torch's half-precision convolutions are very slow.

Videos (.mp4 .mov .avi .mkv .webm .m4v) are read with PyAV (`pip install av`). `video=auto`
writes DIR/<name>.mp4 (H.264, or MPEG-4 if that is missing, at the input's frame rate; even
frame sizes only) when PyAV can encode, else frames; `video=frames` writes DIR/<name>/000000.png ...
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, fields
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

METADATA_FILE = "pairforge.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
VIDEO_CODECS = ("libx264", "mpeg4")  # the first one PyAV can encode with

# TorchScript is what libtorch (C++) loads; torch 2.14's deprecation notice would only confuse a user here
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)


class TranslateError(Exception):
    """A problem with the arguments, the model file or the inputs; printed as one line."""


@dataclass
class Options:
    model: str
    input: str
    output: str
    device: str = "auto"
    batch_size: int = 8
    video: str = "auto"  # auto | video | frames


def parse_options(argv: list[str]) -> Options:
    """`key=value` arguments, as the other pairforge commands take them."""
    names = [field.name for field in fields(Options)]
    values: dict[str, str] = {}
    for argument in argv:
        key, sep, value = argument.partition("=")
        if not sep or key not in names:
            raise TranslateError(f"unknown argument {argument!r}; expected key=value with keys {', '.join(names)}")
        values[key] = value
    missing = [name for name in ("model", "input", "output") if name not in values]
    if missing:
        raise TranslateError(f"missing {', '.join(f'{name}=' for name in missing)} (usage: {__doc__.splitlines()[0]})")
    batch_size = values.pop("batch_size", str(Options.batch_size))
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise TranslateError(f"batch_size={batch_size}: expected a positive integer")
    options = Options(**values, batch_size=int(batch_size))
    if options.video not in ("auto", "video", "frames"):
        raise TranslateError(f"video={options.video}: choose auto, video or frames")
    return options


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TranslateError(f"device={device}, but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(device)


class Translator:
    """An exported generator and its metadata: up to `batch_size` uint8 RGB images [3, H, W] of any size in,
    the same sizes out."""

    def __init__(self, path: str | Path, device: torch.device, batch_size: int):
        files = {METADATA_FILE: ""}
        try:
            self.model = torch.jit.load(str(path), map_location=device, _extra_files=files)
        except (ValueError, RuntimeError) as error:
            raise TranslateError(f"{path} is not a TorchScript file ({str(error).splitlines()[0]})") from None
        if not files[METADATA_FILE]:
            raise TranslateError(f"{path} has no {METADATA_FILE} inside: export it with `python export.py`")
        self.meta = json.loads(files[METADATA_FILE])
        self.device, self.dtype = device, getattr(torch, self.meta["dtype"])
        if self.dtype == torch.float16 and device.type == "cpu":  # torch's CPU half convolutions are very slow
            self.model, self.dtype = self.model.float(), torch.float32
        self.resolution, self.batch_size = self.meta["resolution"], batch_size
        self.generator_seconds = 0.0

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        square = [self.resolution, self.resolution]
        (in_lo, in_hi), (out_lo, out_hi) = self.meta["input_range"], self.meta["output_range"]
        start = self.synchronized_clock()
        x = torch.stack([TF.resize(image.to(self.device).float() / 255, square, antialias=True) for image in images])
        # always batch_size images: TorchScript re-optimises the graph (seconds) for every new input shape
        x = torch.cat([x, x[-1:].expand(self.batch_size - len(images), -1, -1, -1)])
        y = self.model((in_lo + x * (in_hi - in_lo)).to(self.dtype))[:len(images)].float()
        rgb = ((y - out_lo) / (out_hi - out_lo)).clamp(0, 1)
        outputs = [TF.resize(out, list(image.shape[-2:]), antialias=True) for out, image in zip(rgb, images)]
        outputs = [out.mul(255).round().to(torch.uint8).cpu() for out in outputs]
        self.generator_seconds += self.synchronized_clock() - start
        return outputs

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Two calls: TorchScript profiles the first and optimises the graph on the second (seconds on a CPU)."""
        x = torch.zeros(self.batch_size, 3, self.resolution, self.resolution, device=self.device, dtype=self.dtype)
        for _ in range(2):
            self.model(x)

    def synchronized_clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return TF.pil_to_tensor(ImageOps.exif_transpose(image).convert("RGB"))
    except OSError as error:  # PIL's errors for unknown, truncated or unreadable files
        raise TranslateError(f"{path}: cannot read the image ({error})") from None


def write_image(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}  # PIL's default 75 shows
    TF.to_pil_image(image).save(path, **options)


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def import_av():
    try:
        import av
    except ImportError:
        raise TranslateError("reading videos needs PyAV, which is not installed (pip install av); or extract "
                             "the frames (ffmpeg -i VIDEO frames/%06d.png) and translate the folder") from None
    return av


def video_frames(path: Path) -> Iterator[torch.Tensor]:
    av = import_av()
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def video_rate(path: Path) -> Fraction:
    """The frame rate; also where an unreadable video is reported, before anything is written."""
    av = import_av()
    try:
        with av.open(str(path)) as container:
            return container.streams.video[0].average_rate or Fraction(25)
    except (av.error.FFmpegError, IndexError) as error:  # IndexError: a container without a video stream
        raise TranslateError(f"{path}: cannot read the video ({error or 'no video stream'})") from None


def video_encoder() -> str | None:
    """The codec DIR/<name>.mp4 is written with, or None when PyAV is missing or has none of VIDEO_CODECS."""
    try:
        import av
    except ImportError:
        return None
    return next((codec for codec in VIDEO_CODECS if codec in av.codecs_available), None)


class VideoWriter:
    """Frames in, an MP4 out (yuv420p: frame sizes must be even)."""

    def __init__(self, path: Path, rate: Fraction, codec: str):
        av = import_av()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.av, self.container, self.codec, self.rate, self.stream = av, av.open(str(path), "w"), codec, rate, None

    def write(self, frame: torch.Tensor) -> None:
        if self.stream is None:
            height, width = frame.shape[-2:]
            if height % 2 or width % 2:
                raise TranslateError(f"{self.container.name}: {width}x{height} frames cannot be written as "
                                     f"yuv420p video (odd size); use video=frames")
            self.stream = self.container.add_stream(self.codec, rate=self.rate)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        picture = self.av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).numpy(), format="rgb24")
        self.container.mux(self.stream.encode(picture))

    def close(self) -> None:
        if self.stream is not None:
            self.container.mux(self.stream.encode())  # flush the encoder's delayed frames
        self.container.close()


def batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def translate(options: Options) -> int:
    """Translate `options.input` into `options.output`; returns the number of images translated."""
    source, out_dir = Path(options.input), Path(options.output)
    if not source.exists():
        raise TranslateError(f"input={source}: no such file or folder")
    translator = Translator(options.model, pick_device(options.device), options.batch_size)
    translator.warm_up()
    start, count = time.perf_counter(), 0
    if source.suffix.lower() in VIDEO_SUFFIXES:
        count = translate_video(translator, source, out_dir, options)
    else:
        files = image_files(source) if source.is_dir() else [source]
        if not files:
            raise TranslateError(f"input={source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        root = source if source.is_dir() else source.parent
        for paths in batches(files, options.batch_size):
            for path, output in zip(paths, translator([read_image(path) for path in paths])):
                write_image(output, out_dir / path.relative_to(root))
            count += len(paths)
    seconds = time.perf_counter() - start
    print(f"translated {count} images into {out_dir} on {translator.device}: {count / seconds:.2f} images/s "
          f"end to end, {count / translator.generator_seconds:.2f} images/s in the generator (with resizing; "
          f"after 2 warm-up runs)")
    return count


def translate_video(translator: Translator, source: Path, out_dir: Path, options: Options) -> int:
    codec = video_encoder() if options.video != "frames" else None
    if options.video == "video" and codec is None:
        raise TranslateError(f"video=video needs PyAV with one of the encoders {', '.join(VIDEO_CODECS)}; "
                             f"use video=frames")
    rate = video_rate(source)
    writer = VideoWriter(out_dir / f"{source.stem}.mp4", rate, codec) if codec else None
    count = 0
    try:
        for frames in batches(video_frames(source), options.batch_size):
            for output in translator(frames):
                if writer is not None:
                    writer.write(output)
                else:
                    write_image(output, out_dir / source.stem / f"{count:06d}.png")
                count += 1
    finally:
        if writer is not None:
            writer.close()
    if count == 0:
        raise TranslateError(f"input={source}: no video frames could be decoded")
    return count


def main(argv: list[str]) -> None:
    if {"-h", "--help", "help"} & set(argv):
        print(__doc__)
        return
    try:
        translate(parse_options(argv))
    except TranslateError as error:
        print(f"translate: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
