"""translate.py with a stand-in exported model (colour inversion, a few lines of TorchScript): one output
per input with the input's path and size, the value ranges from the metadata, videos, one-line errors."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("translate", REPO / "translate.py")
translate = sys.modules["translate"] = importlib.util.module_from_spec(_spec)  # a script, not a package module
_spec.loader.exec_module(translate)

RESOLUTION = 16


class Invert(nn.Module):
    """In the generator's convention ([-1, 1] in and out) -x inverts colours: rgb -> 1 - rgb."""

    def forward(self, image: Tensor) -> Tensor:
        if image.shape[-1] != 16 or image.shape[-2] != 16:
            raise ValueError("expects 16 x 16 images")
        return -image


@pytest.fixture(scope="module")
def inverter(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "invert.ts"
    meta = {"resolution": RESOLUTION, "dtype": "float32", "input_range": [-1.0, 1.0], "output_range": [-1.0, 1.0]}
    torch.jit.save(torch.jit.script(Invert()), str(path), _extra_files={"pairforge.json": json.dumps(meta)})
    return path


# constant colours survive any resampling, so the inverse colour is exact (up to JPEG's rounding)
IMAGES = {"a.png": ((40, 24), "RGB", (250, 10, 128)), "b.jpg": ((9, 7), "L", 77),
          "sub/c.png": ((16, 16), "RGBA", (0, 200, 30, 90)), "sub/deeper/d.bmp": ((3, 61), "RGB", (5, 6, 7))}


def test_a_folder_of_mixed_sizes_gives_one_output_per_input_with_its_size(inverter, tmp_path, capsys):
    for name, (size, mode, colour) in IMAGES.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, colour).save(tmp_path / "in" / name)
    (tmp_path / "in" / "notes.txt").write_text("not an image")

    translate.main([f"model={inverter}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "batch_size=3"])

    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == sorted(IMAGES)
    for name, (size, mode, colour) in IMAGES.items():
        output = Image.open(tmp_path / "out" / name)
        rgb = np.asarray(Image.new(mode, (1, 1), colour).convert("RGB"))[0, 0].astype(int)
        assert output.size == size and output.mode == "RGB"
        assert np.abs(np.asarray(output).astype(int) - (255 - rgb)).max() <= (2 if name.endswith(".jpg") else 0), name
    assert f"translated {len(IMAGES)} images" in capsys.readouterr().out


def test_one_image_and_the_value_ranges_come_from_the_metadata(tmp_path):
    # a model working in [0, 1] with output in [0, 255]: identity maths, so the output must equal the input
    class Scale(nn.Module):
        def forward(self, image: Tensor) -> Tensor:
            return image * 255

    meta = {"resolution": 8, "dtype": "float32", "input_range": [0.0, 1.0], "output_range": [0.0, 255.0]}
    torch.jit.save(torch.jit.script(Scale()), str(tmp_path / "scale.ts"), _extra_files={"pairforge.json": json.dumps(meta)})
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    translate.main([f"model={tmp_path / 'scale.ts'}", f"input={tmp_path / 'x.png'}", f"output={tmp_path / 'out'}"])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), pixels)


def test_a_float16_model_runs_in_float32_on_a_cpu(tmp_path):
    meta = {"resolution": 8, "dtype": "float16", "input_range": [-1.0, 1.0], "output_range": [-1.0, 1.0]}
    model = torch.jit.script(nn.Conv2d(3, 3, 1).half())
    torch.jit.save(model, str(tmp_path / "half.ts"), _extra_files={"pairforge.json": json.dumps(meta)})
    translator = translate.Translator(tmp_path / "half.ts", torch.device("cpu"), batch_size=2)
    assert translator.dtype == torch.float32 and {p.dtype for p in translator.model.parameters()} == {torch.float32}
    (output,) = translator([torch.zeros(3, 5, 7, dtype=torch.uint8)])
    assert output.shape == (3, 5, 7) and output.dtype == torch.uint8


def write_video(path: Path, frames: int, size=(48, 32)) -> None:
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            picture = np.full((size[1], size[0], 3), 20 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="needs PyAV")
def test_a_video_gives_a_video_or_frames(inverter, tmp_path):
    import av
    write_video(tmp_path / "clip.mp4", frames=5)
    translate.main([f"model={inverter}", f"input={tmp_path / 'clip.mp4'}", f"output={tmp_path / 'out'}", "batch_size=2"])
    with av.open(str(tmp_path / "out" / "clip.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
    translate.main([f"model={inverter}", f"input={tmp_path / 'clip.mp4'}", f"output={tmp_path / 'out'}", "video=frames"])
    pngs = sorted((tmp_path / "out" / "clip").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert abs(int(np.asarray(Image.open(pngs[3])).mean()) - (255 - 60)) <= 3
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(translate.TranslateError, match="broken.mp4: cannot read the video"):
        translate.translate(translate.parse_options([f"model={inverter}", f"input={tmp_path / 'broken.mp4'}",
                                                     f"output={tmp_path / 'out'}"]))


def error_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        translate.main(argv)
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("translate: ")
    return lines[0]


def test_errors_are_one_line(inverter, tmp_path, capsys, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "plain.pt").write_bytes(b"")
    torch.jit.save(torch.jit.script(Invert()), str(tmp_path / "bare.ts"))
    image = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(image)
    io = [f"input={image}", f"output={tmp_path / 'out'}"]
    assert "missing model=" in error_of(io, capsys)
    assert "unknown argument 'size=3'" in error_of([f"model={inverter}", *io, "size=3"], capsys)
    assert "batch_size=0: expected a positive integer" in error_of([f"model={inverter}", *io, "batch_size=0"], capsys)
    assert "is not a TorchScript file" in error_of([f"model={tmp_path / 'plain.pt'}", *io], capsys)
    assert "has no pairforge.json inside" in error_of([f"model={tmp_path / 'bare.ts'}", *io], capsys)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "broken.png").write_bytes(b"\x89PNG not really")
    folder = [f"input={tmp_path / 'folder'}", io[1]]
    assert "broken.png: cannot read the image" in error_of([f"model={inverter}", *folder], capsys)
    assert "no such file or folder" in error_of([f"model={inverter}", f"input={tmp_path / 'nope'}", io[1]], capsys)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    assert "reading videos needs PyAV" in error_of([f"model={inverter}", f"input={tmp_path / 'clip.mp4'}", io[1]], capsys)
