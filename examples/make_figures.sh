#!/usr/bin/env bash
# Regenerate figures/ (Fig. 2a, Fig. 2b, rasters) with the CLI.
#   bash examples/make_figures.sh [FP_CHECKPOINT QUANTIZED_CHECKPOINT]
# Without arguments it converts the offline MiniLM (first 4 layers) to a full-precision and a
# 1.58-bit spiking model first; pass trained checkpoints to draw them instead.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${T:-80}
work=$(mktemp -d)
fp=${1:-$work/fp.pt}
q=${2:-$work/ternary.pt}
[ -f "$fp" ] || spikesim convert --weights fp --task sst2 --out "$fp"
[ -f "$q" ] || spikesim convert --weights ternary --task sst2 --out "$q"
texts=(--text "a gripping, beautifully acted film" --text "the plot is thin and the jokes fall flat"
       --text "an uneven but often moving portrait" --text "I have rarely been this bored in a cinema")
spikesim run --checkpoint "$q" --timesteps "$T" "${texts[@]}" --out "$work/run" \
    --raster-site layer.0.output --raster-site layer.3.output >/dev/null
spikesim compare --checkpoint "$fp" --checkpoint "$q" --timesteps "$T" "${texts[@]}" --out "$work/compare" --json \
    > figures/compare.json
mkdir -p figures
cp "$work/run/asr_convergence.png" figures/fig2a_asr_convergence.png
cp "$work/run/raster.png" figures/raster.png
cp "$work/compare/fig2b.png" figures/fig2b_fp_vs_ternary.png
echo "figures written to figures/ (work files in $work)"
