#!/usr/bin/env bash
# The exact commands behind the RTE students of the README and results/README.md (seed 42, 2-core CPU, torch 2.13.0+cpu;
# every step resumes after a kill). First run of steps 1-2: OMP_NUM_THREADS=1 beside one other training
# job (results/rte/1thread/); the README's numbers: steps 1-3 re-run with OMP_NUM_THREADS=2 as the
# only job, 53 min (results/rte/rerun.log); all four steps again on 2026-12-06 (results/rte/rerun2.log:
# steps 1-3 identical to the last digit).
#   bash examples/reproduce_rte.sh [OUT_DIR]      (default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
G=${DATA:-../shared/glue}
R=${1:-runs}
TE=$R/teachers/rte
# 1. teacher: the offline MiniLM-L6-H384 fine-tuned on RTE (2,490 pairs; 5 epochs)
[ -f "$TE/teacher_summary.json" ] || \
  spikesim teacher --task rte --data "$G" --epochs 5 --lr 5e-5 --batch-size 16 --seed 42 --out "$TE"
common=(--task rte --data "$G" --teacher "$TE" --batch-size 32 --seed 42 --lr 1e-4 --method steady_state --resume)
kd_eval=(--eval-every 1000000 --eval-timesteps 8 --eval-limit 64)   # the kd stage's classifier is untrained
# 2. full-precision student from the teacher's layers: intermediate KD (3 epochs), soft-label KD (3 epochs)
spikesim train "${common[@]}" --weights fp --stage kd --max-steps 234 "${kd_eval[@]}" --out "$R/rte/fp-kd"
spikesim train "${common[@]}" --weights fp --stage predict --max-steps 234 --eval-every 1000000 --eval-timesteps 80 \
    --init "$R/rte/fp-kd/last.pt" --out "$R/rte/fp-pred"
# 3. fine-tuning on the true labels (the paper's last stage) from step 2's student, 3 epochs
spikesim train "${common[@]}" --weights fp --stage finetune --max-steps 234 --eval-every 78 --eval-timesteps 80 \
    --init "$R/rte/fp-pred/last.pt" --out "$R/rte/fp-ft"
# 4. 1.58-bit and 1-bit students from step 3's best: intermediate KD (1 epoch), then fine-tuning on the
#    true labels (2 epochs), as CoLA's step 5
for w in ternary binary; do
  spikesim train "${common[@]}" --weights $w --stage kd --max-steps 78 "${kd_eval[@]}" \
      --init "$R/rte/fp-ft/best.pt" --out "$R/rte/$w-kd"
  spikesim train "${common[@]}" --weights $w --stage finetune --max-steps 156 --eval-every 78 --eval-timesteps 80 \
      --init "$R/rte/$w-kd/last.pt" --out "$R/rte/$w-ft"
done
