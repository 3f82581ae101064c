"""The gallery page in a real headless browser (Debian's chromium): it loads from disk, shows thumbnails,
sorts by a score and pages."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datagen.gallery import main as gallery_main, write_grid
from datagen.shards import ShardWriter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CLIP_GAIN = [0.30, -0.10, 0.05, 0.20, None, 0.12]  # sample 4 lacks the score: it sorts last either way
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Six pairs in two finished shards and one unfinished: sample i's input is solid grey 40 * i."""
    run_dir = tmp_path_factory.mktemp("gallery") / "run"
    run_dir.mkdir()
    OmegaConf.save(OmegaConf.create({"task": {"name": "cat2dog", "thresholds": {"clip_gain": 0.1, "seg_iou": None}}}),
                   run_dir / "config.yaml")
    for shard in range(3):
        writer = ShardWriter(run_dir, shard)
        for i in range(3 * shard, 3 * shard + 3):
            gain = CLIP_GAIN[i % len(CLIP_GAIN)]
            scores = {"clip_gain": gain, "seg_iou": 0.5} if gain is not None else {"seg_iou": 0.5}
            meta = {"key": f"{i:09d}", "index": i, "prompt": f"a <b>cat</b> number {i}", "scores": scores, "xa_loss": 0.01 * i}
            writer.write(meta["key"], torch.full((3, 32, 32), 40 * i / 255), torch.zeros(3, 32, 32), meta)
        if shard < 2:
            writer.close()
    assert gallery_main([str(run_dir), "--per-page", "4", "--thumb-size", "24"]) == 0
    return run_dir


def open_page(run_dir: Path, tmp_path: Path, fragment: str = "") -> str:
    """The page's DOM after its scripts ran and its images loaded."""
    url = (run_dir / "gallery" / "index.html").resolve().as_uri() + fragment
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def shown(dom: str) -> list[int]:
    return [int(key) for key in re.findall(r'<figure data-key="(\d+)"', dom)]


def test_thumbnails_are_small_jpegs_of_the_inputs(run_dir):
    for i in range(6):
        thumb = np.asarray(Image.open(run_dir / "gallery" / "thumbs" / f"{i:09d}.input.jpg"))
        assert thumb.shape == (24, 24, 3) and abs(thumb.mean() - 40 * i) <= 2
    assert not (run_dir / "gallery" / "thumbs" / "000000006.input.jpg").exists()  # unfinished shard: not shown
    data = json.loads((run_dir / "gallery" / "data.js").read_text().removeprefix("const GALLERY = ").rstrip(";\n"))
    assert data["scores"] == ["clip_gain", "seg_iou", "xa_loss"] and data["thresholds"] == {"clip_gain": 0.1}


@needs_chromium
def test_page_loads_with_thumbnails_and_captions(run_dir, tmp_path):
    dom = open_page(run_dir, tmp_path)
    assert shown(dom) == [0, 1, 2, 3]  # first page of 4, in index order
    assert dom.count('data-loaded="1"') == 8  # both thumbnails of every pair shown, decoded by the browser
    assert "6 pairs, sorted by index (asc), page 1 of 2" in dom
    assert "000000001: a &lt;b&gt;cat&lt;/b&gt; number 1" in dom  # captions are text, never markup
    assert '<span class="below">clip_gain -0.100' in dom  # under the task's threshold


@needs_chromium
def test_sorting_by_a_score_and_paging(run_dir, tmp_path):
    assert shown(open_page(run_dir, tmp_path, "#sort=clip_gain&order=desc")) == [0, 3, 5, 2]
    assert shown(open_page(run_dir, tmp_path, "#sort=clip_gain&order=desc&page=2")) == [1, 4]
    assert shown(open_page(run_dir, tmp_path, "#sort=clip_gain&order=asc")) == [1, 2, 5, 3]


def test_grid_shows_each_input_above_its_edit(run_dir):
    grid = np.asarray(Image.open(write_grid(run_dir, pairs=4, columns=2, scale=2, gap=2)))
    assert grid.shape == (2 * (2 * 64 + 2) + 4, 2 * 64 + 2, 3)
    for i in range(4):
        x, y = (i % 2) * 66, (i // 2) * 134
        assert (grid[y:y + 64, x:x + 64] == 40 * i).all() and (grid[y + 66:y + 130, x:x + 64] == 0).all()


def test_folder_grid_pairs_translated_images_with_their_inputs_by_name(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), outputs.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(inputs / f"{i}.png")
        if i != 1:   # an input without a result is left out
            Image.new("RGB", (8, 8), (0, 10 * i, 0)).save(outputs / f"{i}.png")
    assert gallery_main([str(outputs), "--inputs", str(inputs), "--grid", "8"]) == 0
    grid = np.asarray(Image.open(outputs / "grid.png"))
    assert grid.shape == (2 * 24 + 2, 2 * 24 + 2, 3)
    for column, i in enumerate((0, 2)):
        x = column * 26
        assert (grid[:24, x:x + 24] == (10 * i, 0, 0)).all() and (grid[26:50, x:x + 24] == (0, 10 * i, 0)).all()
