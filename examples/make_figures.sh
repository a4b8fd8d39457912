#!/usr/bin/env bash
# Regenerate figures/ from the shipped SST-2 students:
#   bash examples/make_figures.sh            # figures only (Fig. 2a, Fig. 2b, rasters, accuracy vs T
#                                            # from the committed results/{sst2,mrpc}/sweep-*.json reports)
#   SWEEP=1 bash examples/make_figures.sh    # also re-measure accuracy vs T on the SST-2 dev set
#                                            # (one T=128 simulation and one adaptive run per student, the README's
#                                            # results command; 12-18 min each on 2 CPU cores)
# FP=... Q=... choose other checkpoints for Fig. 2a/2b (Q is drawn in Fig. 2a); T=80 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${T:-80}
FP=${FP:-checkpoints/sst2-fp.pt}
Q=${Q:-checkpoints/sst2-1.58bit.pt}
DATA=${DATA:-../shared/glue}
work=$(mktemp -d)
mkdir -p figures results/sst2
texts=(--text "a gripping, beautifully acted film" --text "the plot is thin and the jokes fall flat"
       --text "an uneven but often moving portrait" --text "I have rarely been this bored in a cinema")
spikesim run --checkpoint "$Q" --timesteps "$T" "${texts[@]}" --out "$work/run" \
    --raster-site layer.0.output --raster-site layer.3.output >/dev/null
spikesim compare --checkpoint "$FP" --checkpoint "$Q" --timesteps "$T" "${texts[@]}" --out "$work/compare" --json \
    > figures/compare.json
cp "$work/run/asr_convergence.png" figures/fig2a_asr_convergence.png
cp "$work/run/raster.png" figures/raster.png
cp "$work/compare/fig2b.png" figures/fig2b_fp_vs_ternary.png
students=(fp 1.58bit 1bit)
reports=("${students[@]/#/results/sst2/sweep-}"); reports=("${reports[@]/%/.json}")
if [ "${SWEEP:-0}" = 1 ]; then
  for name in "${students[@]}"; do
    spikesim eval --checkpoint "checkpoints/sst2-$name.pt" --task sst2 --data "$DATA" --timesteps 80 \
        --sweep 1,2,4,8,12,16,24,32,48,64,80,96,128 --adaptive --label "$name" --out "results/sst2/sweep-$name.json" >/dev/null
  done
fi
if ls "${reports[@]}" >/dev/null 2>&1; then
  spikesim plot "${reports[@]}" --out "$work/sweep" >/dev/null
  cp "$work/sweep/accuracy_vs_timesteps.png" figures/accuracy_vs_timesteps.png
fi
# the same students with every membrane starting at V_th/2 (--initial-membrane 0.5) beside the shipped curves
half=(results/sst2/sweep-fp-half.json results/sst2/sweep-1.58bit-half.json results/sst2/sweep-1bit-half.json)
if [ "${SWEEP:-0}" = 1 ]; then
  for name in "${students[@]}"; do
    spikesim eval --checkpoint "checkpoints/sst2-$name.pt" --task sst2 --data "$DATA" --timesteps 80 \
        --sweep 1,2,4,8,12,16,24,32,48,64,80,96,128 --adaptive --initial-membrane 0.5 --label "$name-half" \
        --out "results/sst2/sweep-$name-half.json" >/dev/null
  done
fi
if ls "${reports[@]}" "${half[@]}" >/dev/null 2>&1; then
  spikesim plot "${reports[@]}" "${half[@]}" --out "$work/half" >/dev/null
  cp "$work/half/accuracy_vs_timesteps.png" figures/accuracy_vs_timesteps_initial_membrane.png
fi
# MRPC accuracy vs T of the transfer-set students (reports made by examples/reproduce_mrpc.sh's students and
# the eval command in the README's MRPC section), in accuracy: its main metric averages accuracy and F1
mrpc=(results/mrpc/sweep-fp-t.json results/mrpc/sweep-1.58bit-t.json results/mrpc/sweep-1bit-t.json)
if ls "${mrpc[@]}" >/dev/null 2>&1; then
  spikesim plot "${mrpc[@]}" --metric accuracy --out figures/mrpc >/dev/null
fi
echo "figures written to figures/ (work files in $work)"
