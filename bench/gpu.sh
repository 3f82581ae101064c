#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (and the toy world's GPU stages), in parts of under 10 minutes each, so that
# one part fits one call of a lent machine; on your own GPU run them one after another.
#
#   bash bench/gpu.sh generate    # the inversion's noise regularizer; our editor vs the reference loop: fp16 + bf16
#                                 # (--profile), then fp32
#   bash bench/gpu.sh generator   # distilled generator: batch sweep, batch 1 in fp32/bf16; training throughput
#   bash bench/gpu.sh compile     # our editor eager vs its UNet under torch.compile, bf16, batch 8
#   bash bench/gpu.sh teachers    # the other teachers and inversions beside pix2pix-zero, SD-1.4 size, bf16, batch 8
#   bash bench/gpu.sh stylediffusion  # StyleDiffusion beside null-text inversion, SD-1.4 size, bf16, 512 px
#   bash bench/gpu.sh toy         # toy world: UNet (3500 x 512) + decoder fine-tune, into $OUT/world
#
# Results go to $OUT (default bench/results), with a log per part. Every command runs under `timeout`: each
# bench script keeps the rows it finished in its JSON, and a toy stage saves what it trained, when cut off.
set -uo pipefail
part=${1:?usage: bash bench/gpu.sh generate|generator|compile|teachers|stylediffusion|toy}
out=${OUT:-bench/results}
mkdir -p "$out"
log="$out/gpu-$part.log"

run() {  # run SECONDS ARGS...: python3 ARGS under a time limit, output shown and logged
  local seconds=$1
  shift
  echo "\$ python3 $*" | tee -a "$log"
  timeout -k 20 "$seconds" python3 "$@" 2>&1 | tee -a "$log"
}

case $part in
  generate)
    run 40 -m bench.regularizer --batches 1 8 16 --out "$out/regularizer_h100.json"
    run 320 -m bench.generate --steps 20 --precisions fp16 bf16 --profile --out "$out/generate_h100_half.json"
    run 200 -m bench.generate --steps 20 --precisions fp32 --batches 1 8 --out "$out/generate_h100_fp32.json"
    ;;
  generator)
    run 200 -m bench.latency --presets comodgan_512 --precisions fp16 --batches 8 64 256 \
      --modes eager torchscript compile-cudagraphs --out "$out/latency_h100_512_batch.json"
    run 120 -m bench.latency --presets comodgan_512 --precisions fp32 bf16 --batches 1 \
      --modes eager torchscript compile-cudagraphs --out "$out/latency_h100_512_b1_more.json"
    run 210 -m bench.train --batch-size 64 16 --precisions bf16-mixed --channels-last false true --steps 10 \
      --out "$out/train_h100.json"
    ;;
  compile)
    # minutes of compiling first (four graphs and a backward at SD-1.4 size), hence the one batch size
    run 560 -m bench.generate --steps 20 --precisions bf16 --batches 8 --compile --no-reference \
      --out "$out/generate_h100_compile.json"
    ;;
  teachers)
    # null-text inversion is ~4x pix2pix-zero's cost: 20 steps keep the table under the call's limit (StyleDiffusion,
    # ~25x, has its own part)
    run 560 -m bench.generate --editor pix2pix_zero:direct pix2pix_zero:null_text p2p p2p:null_text p2p:negative_prompt \
      p2p:direct word_swap sdedit --steps 20 --precisions bf16 --batches 8 --out "$out/generate_h100_teachers.json"
    ;;
  stylediffusion)
    # Up to 1015 UNet forward+backward passes per image at its 30 steps (K_i = 100, 91, ...): s/pair is the inversion
    # plus the edit (the edit alone: s/pair - the inversion's "seconds" in a sample's json), UNet evals counted by a
    # hook; peak GiB at batch 8 tells what fits a 24 / 80 GB card. Not measured yet; no warm-up (minutes per row).
    run 560 -m bench.generate --editor stylediffusion p2p:null_text --steps 30 --precisions bf16 --batches 1 \
      --warmup 0 --out "$out/generate_h100_stylediffusion.json"
    # the first 10 steps are 2/3 of the inversion's work (668 of 1015 inner steps): the memory of larger batches
    run 560 -m bench.generate --editor stylediffusion --steps 10 --precisions bf16 --batches 4 8 --warmup 0 \
      --out "$out/generate_h100_stylediffusion_batch.json"
    ;;
  toy)
    # the UNet loads the world's other models from --out: train a copy, bring $OUT/world back
    rm -rf "$out/world" && cp -r toyworld/weights "$out/world"
    run 540 -m toyworld.train --device cuda --out "$out/world" --stages unet vae_decoder
    ;;
  *)
    echo "unknown part: $part (generate, generator, compile, teachers, stylediffusion or toy)" >&2
    exit 2
    ;;
esac
