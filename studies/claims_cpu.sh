#!/usr/bin/env bash
# The claim presets at a budget that fits a 2-core CPU in about two hours (the README's "Claim experiments").
#
# Each preset's own budget (15 epochs, full data, 5 seeds) is GPU-sized; here every Fashion-MNIST run trains 5 epochs
# on 10,000 images and the cluttered runs 5 epochs on 4,000 (64×64 canvas, 2,000 validation images), 3 seeds, bf16.
# Runs that two presets share (same entry, data, seed and settings) are trained once and copied; `compare --resume`
# checks every setting of a copied run before reusing it (the fmm preset's resnet20 differs: it trains with
# --nonfinite skip, so that a product form that blows up still finishes). Each report says on its first lines how its budget departs
# from the preset's. Usage: bash studies/claims_cpu.sh [OUT]   (default runs/claims; resumable)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/claims}
A=${ATTNLAB:-.venv/bin/attnlab}
FM=(--epochs 5 --subset 10000 --seeds 3 --precision bf16 --jobs 2 --resume)
CL=(--epochs 5 --subset 4000 --val-size 2000 --seeds 3 --precision bf16 --jobs 2 --resume)

share() {  # share FROM TO DATASET ENTRY...: reuse finished runs of one preset in another
  local from=$1 to=$2 data=$3
  shift 3
  mkdir -p "$OUT/$to/runs/$data"
  for entry in "$@"; do
    [ -e "$OUT/$to/runs/$data/$entry" ] || cp -a "$OUT/$from/runs/$data/$entry" "$OUT/$to/runs/$data/$entry"
  done
}

"$A" compare --preset consistency --out "$OUT/consistency" "${FM[@]}" --analysis-images 500
share consistency smoothness fashion-mnist resnet20 se_resnet20 cbam_resnet20 cram_resnet20
share consistency aw fashion-mnist resnet20 se_resnet20
"$A" compare --preset aw --out "$OUT/aw" "${FM[@]}"
"$A" compare --preset fmm --dataset fashion-mnist --out "$OUT/fmm-fashion-mnist" "${FM[@]}"
"$A" compare --preset smoothness --out "$OUT/smoothness" "${FM[@]}" --analysis-images 300
"$A" compare --preset cram --out "$OUT/cram" "${CL[@]}" --analysis-images 500
"$A" compare --preset fmm --dataset cluttered-fashion-mnist --out "$OUT/fmm-cluttered" "${CL[@]}"
