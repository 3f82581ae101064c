#!/usr/bin/env bash
# The whole chain offline, on the trained toy world (model=toy, toyworld/): generate -> filter -> distil ->
# export -> translate, in about 10 minutes on a free 2-core CPU. Usage: bash quickstart.sh [OUT] (default out/toy).
# Pictures: OUT/gallery/grid.png (pix2pix-zero's pairs, inputs above edits) and OUT/translated/grid.png
# (the distilled generator on fresh circles it never saw, inputs above its outputs). Last, the student and its teacher
# edit the same 64 held-out renders and are judged against their true edits: the student / teacher correct-edit rate
# is printed, with the table in OUT/eval/circle2square/ground_truth.md (the paper's metrics in report.md beside it).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-.venv/bin/python}
out=${1:-out/toy}

$python generate.py task=circle2square model=toy num_pairs=256 batch_size=32 editor.num_inference_steps=25 out_dir="$out"
$python -m filters "$out"
$python -m datagen.gallery "$out" --grid 32
$python train.py experiment=toy data.path="$out/filtered" out_dir="$out/run"
$python export.py ckpt="$out/run/checkpoints/last.ckpt" out="$out/generator.ts"
$python translate.py model="$out/generator.ts" input=toyworld/examples output="$out/translated"
$python -m datagen.gallery "$out/translated" --inputs toyworld/examples --grid 16
$python evaluate.py data.path="$out/filtered" student="$out/generator.ts" out="$out/eval"
