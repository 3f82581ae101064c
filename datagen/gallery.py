"""python -m datagen.gallery DIR [--per-page 100] [--thumb-size 160] [--grid N]: a static page of a run's pairs.

`python -m datagen.gallery OUTPUTS --inputs INPUTS --grid N` instead pictures translate.py's results: OUTPUTS/grid.png.

Writes DIR/gallery/index.html, data.js (every finished pair's caption, scores and thumbnail names) and
thumbs/KEY.input.jpg, KEY.edited.jpg. The page opens from disk with no server (file://), sorts by any
score and shows one page of pairs at a time, so 15,000 pairs load as fast as 100. Its state lives in the
address (#sort=clip_gain&order=desc&page=3): a view can be bookmarked or shared. Rerunning adds the
thumbnails of newly finished shards and keeps the others.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from datagen.shards import finished_shards

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pairforge gallery</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 1em; background: #fafafa; }
  header { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; margin-bottom: 1em; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
  figure { margin: 0; padding: 8px; background: white; border: 1px solid #ddd; border-radius: 4px; }
  figure img { width: 160px; height: 160px; object-fit: contain; background: #eee; }
  figcaption { margin-top: 4px; }
  .scores { color: #555; font-variant-numeric: tabular-nums; }
  .below { color: #b00; }
</style>
<script src="data.js"></script>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <label>sort by <select id="sort"></select></label>
  <button id="order"></button>
  <button id="prev">&larr; previous</button> <span id="status"></span> <button id="next">next &rarr;</button>
</header>
<main id="grid"></main>
<script>
"use strict";
const data = GALLERY;
const fields = ["index", ...data.scores];
const value = (item, field) => field === "index" ? item.index : item.scores[field];

function state() {  // the view lives in the address: #sort=NAME&order=asc|desc&page=N
  const hash = new URLSearchParams(location.hash.slice(1));
  const sort = fields.includes(hash.get("sort")) ? hash.get("sort") : "index";
  const order = hash.get("order") === "desc" ? "desc" : "asc";
  return { sort, order, page: Math.max(1, parseInt(hash.get("page") || "1", 10) || 1) };
}
function go(change) {
  location.hash = new URLSearchParams({ ...state(), ...change }).toString();
}
function sorted(sort, order) {
  const sign = order === "desc" ? -1 : 1;
  return [...data.items].sort((a, b) => {
    const x = value(a, sort), y = value(b, sort);
    const missing = (typeof x !== "number") - (typeof y !== "number");  // pairs without the score go last
    return missing || sign * (x - y) || a.index - b.index;
  });
}
function figure(item) {
  const fig = document.createElement("figure");
  fig.dataset.key = item.key;
  for (const side of ["input", "edited"]) {
    const img = document.createElement("img");
    img.alt = img.title = side;
    img.addEventListener("load", () => { img.dataset.loaded = "1"; });
    img.src = "thumbs/" + item.key + "." + side + ".jpg";
    fig.append(img);
  }
  const caption = document.createElement("figcaption");
  const text = document.createElement("div");
  text.textContent = item.key + ": " + item.text;
  const scores = document.createElement("div");
  scores.className = "scores";
  for (const name of data.scores) {
    const span = document.createElement("span");
    const score = item.scores[name];
    span.textContent = name + " " + (typeof score === "number" ? score.toPrecision(3) : "-") + "  ";
    if (typeof score === "number" && typeof data.thresholds[name] === "number" && score < data.thresholds[name]) {
      span.className = "below";  // under the task's threshold: the filters would drop this pair
    }
    scores.append(span);
  }
  caption.append(text, scores);
  fig.append(caption);
  return fig;
}
function render() {
  const { sort, order, page } = state();
  const pages = Math.max(1, Math.ceil(data.items.length / data.per_page));
  const shown = Math.min(page, pages);
  const items = sorted(sort, order).slice((shown - 1) * data.per_page, shown * data.per_page);
  document.getElementById("grid").replaceChildren(...items.map(figure));
  document.getElementById("sort").value = sort;
  document.getElementById("order").textContent = order === "desc" ? "descending" : "ascending";
  document.getElementById("status").textContent =
    data.items.length + " pairs, sorted by " + sort + " (" + order + "), page " + shown + " of " + pages;
  document.getElementById("prev").disabled = shown <= 1;
  document.getElementById("next").disabled = shown >= pages;
}
document.getElementById("title").textContent = data.title;
document.title = data.title;
for (const field of fields) {
  document.getElementById("sort").append(new Option(field, field));
}
document.getElementById("sort").addEventListener("change", (e) => go({ sort: e.target.value, page: 1 }));
document.getElementById("order").addEventListener("click",
  () => go({ order: state().order === "asc" ? "desc" : "asc", page: 1 }));
document.getElementById("prev").addEventListener("click", () => go({ page: state().page - 1 }));
document.getElementById("next").addEventListener("click", () => go({ page: state().page + 1 }));
window.addEventListener("hashchange", render);
render();
</script>
</body>
</html>
"""


def thumbnail(png: bytes, path: Path, size: int) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail((size, size))
    image.save(path, format="JPEG", quality=85)


def write_gallery(run_dir: Path, per_page: int = 100, thumb_size: int = 160) -> Path:
    """Write run_dir/gallery/ for the run's finished shards; returns the index.html path."""
    out = run_dir / "gallery"
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    items, score_names = [], set()
    for _, record in sorted(finished_shards(run_dir).items()):
        for sample in wds.WebDataset(str(run_dir / "shards" / record.shard), shardshuffle=False, empty_check=False):
            meta, key = json.loads(sample["json"]), sample["__key__"]
            for side in ("input", "edited"):
                path = out / "thumbs" / f"{key}.{side}.jpg"
                if not path.exists():  # a rerun only adds what is new
                    thumbnail(sample[f"{side}.png"], path, thumb_size)
            scores = {name: v for name, v in meta.get("scores", {}).items() if isinstance(v, (int, float))}
            if "xa_loss" in meta:
                scores["xa_loss"] = meta["xa_loss"]
            score_names |= scores.keys()
            items.append({"key": key, "index": meta["index"], "text": meta.get("prompt") or meta.get("caption") or "",
                          "scores": scores})
    config = OmegaConf.load(run_dir / "config.yaml")
    data = {
        "title": f"{config.task.name}: {len(items)} pairs ({run_dir.name})",
        "per_page": per_page, "scores": sorted(score_names), "items": items,
        "thresholds": {name: v for name, v in (config.task.get("thresholds") or {}).items() if v is not None},
    }
    (out / "data.js").write_text(f"const GALLERY = {json.dumps(data)};\n", encoding="utf-8")
    (out / "index.html").write_text(PAGE, encoding="utf-8")
    return out / "index.html"


def write_grid(run_dir: Path, pairs: int = 32, **layout) -> Path:
    """run_dir/gallery/grid.png: the first `pairs` finished pairs, each column an input above its edit."""
    images = []
    for _, record in sorted(finished_shards(run_dir).items()):
        for sample in wds.WebDataset(str(run_dir / "shards" / record.shard), shardshuffle=False, empty_check=False):
            images.append([Image.open(io.BytesIO(sample[f"{side}.png"])).convert("RGB") for side in ("input", "edited")])
            if len(images) == pairs:
                break
        if len(images) == pairs:
            break
    if not images:
        raise SystemExit(f"{run_dir} has no finished pairs yet")
    return paint_grid(images, run_dir / "gallery" / "grid.png", **layout)


def write_folder_grid(outputs: Path, inputs: Path, pairs: int = 32, **layout) -> Path:
    """outputs/grid.png: images of `inputs` above the same-named images of `outputs` (translate.py's
    results), the first `pairs` names in order."""
    names = sorted(path.name for path in outputs.iterdir() if path.suffix.lower() in (".png", ".jpg", ".jpeg")
                   and path.name != "grid.png" and (inputs / path.name).is_file())[:pairs]
    if not names:
        raise SystemExit(f"no image of {outputs} has a same-named input in {inputs}")
    images = [[Image.open(folder / name).convert("RGB") for folder in (inputs, outputs)] for name in names]
    return paint_grid(images, outputs / "grid.png", **layout)


def paint_grid(pairs: list[list[Image.Image]], path: Path, columns: int = 8, scale: int = 3, gap: int = 2) -> Path:
    """Each column an image above its edit, upscaled `scale` times with nearest neighbours so small images
    stay sharp (a picture for a README)."""
    w, h = pairs[0][0].width * scale, pairs[0][0].height * scale
    columns, rows = min(columns, len(pairs)), -(-len(pairs) // columns)
    # A column: image, gap, edit; rows apart by 2 gaps.
    grid = Image.new("RGB", (columns * (w + gap) - gap, rows * (2 * h + 3 * gap) - 2 * gap), "white")
    for i, pair in enumerate(pairs):
        x, y = (i % columns) * (w + gap), (i // columns) * (2 * h + 3 * gap)
        for side, image in enumerate(pair):
            grid.paste(image.resize((w, h), Image.NEAREST), (x, y + side * (h + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen.gallery", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a generation output directory (holds config.yaml and shards/)")
    parser.add_argument("--per-page", type=int, default=100, help="pairs per page (default 100)")
    parser.add_argument("--thumb-size", type=int, default=160, help="thumbnail side in pixels (default 160)")
    parser.add_argument("--grid", type=int, default=0, metavar="N", help="also write gallery/grid.png of the first N pairs")
    parser.add_argument("--inputs", type=Path, metavar="IN",
                        help="DIR holds translated images instead: write DIR/grid.png of IN's images above them (--grid N)")
    args = parser.parse_args(argv)
    if args.inputs:
        print(f"grid: {write_folder_grid(args.run_dir, args.inputs, args.grid or 32)}")
        return 0
    if not (args.run_dir / "config.yaml").is_file():
        parser.error(f"{args.run_dir / 'config.yaml'} not found: DIR must be a generation run's output directory")
    page = write_gallery(args.run_dir, args.per_page, args.thumb_size)
    print(f"open {page.resolve().as_uri()}")
    if args.grid:
        print(f"grid: {write_grid(args.run_dir, args.grid)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
