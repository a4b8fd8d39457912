#!/usr/bin/env bash
# The exact commands behind the STS-B students in the README and results/README.md (seed 42, 2-core CPU, torch 2.13.0+cpu,
# OMP_NUM_THREADS=2 as the only job: 1.5-1.9 s per KD step, 0.65-0.85 per fine-tuning step, ~5 min per
# T = 80 dev evaluation, 2 h 7 min for steps 1-4 and 20 min for step 5; every step resumes after a
# kill). An earlier run of steps 1-2 with OMP_NUM_THREADS=1 beside another job (~3 s per step) is in
# results/stsb/1thread/.
#   bash examples/reproduce_stsb.sh [OUT_DIR]      (default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
G=${DATA:-../shared/glue}
R=${1:-runs}
TE=$R/teachers/stsb
# 1. teacher: the offline MiniLM-L6-H384 fine-tuned on STS-B (5,749 pairs; 3 epochs; Pearson 85.7, Spearman 85.8)
[ -f "$TE/teacher_summary.json" ] || \
  spikesim teacher --task stsb --data "$G" --epochs 3 --lr 5e-5 --batch-size 16 --seed 42 --out "$TE"
common=(--task stsb --data "$G" --teacher "$TE" --batch-size 32 --seed 42 --lr 1e-4 --method steady_state --resume)
kd_eval=(--eval-every 1000000 --eval-timesteps 8 --eval-limit 64)   # the kd stage's regressor is untrained
# 2. full-precision student from the teacher's layers with MRPC's recipe (step 6 of reproduce_mrpc.sh): the
#    transfer set (MRPC's and RTE's pairs join STS-B's, 11,907 pairs, 372 steps an epoch), intermediate KD for
#    one epoch, then soft-label (score) KD for one epoch evaluated every 186 steps
tr=(--transfer mrpc --transfer rte)
spikesim train "${common[@]}" "${tr[@]}" --weights fp --stage kd --max-steps 372 "${kd_eval[@]}" --out "$R/stsb/fp-t-kd"
spikesim train "${common[@]}" "${tr[@]}" --weights fp --stage predict --max-steps 372 --eval-every 186 --eval-timesteps 80 \
    --init "$R/stsb/fp-t-kd/last.pt" --out "$R/stsb/fp-t-pred"
# 3. fine-tuning on the true scores (the paper's last stage) from step 2's student, 6 epochs of STS-B alone
#    (180 steps an epoch)
spikesim train "${common[@]}" --weights fp --stage finetune --max-steps 1080 --eval-every 180 --eval-timesteps 80 \
    --init "$R/stsb/fp-t-pred/last.pt" --out "$R/stsb/fp-t-ft"
# 4. (ternary) and 5. (binary): 1.58-bit and 1-bit students from step 3's best, intermediate KD (1 epoch)
#    then fine-tuning (2 epochs)
for w in ternary binary; do
  spikesim train "${common[@]}" --weights $w --stage kd --max-steps 180 "${kd_eval[@]}" \
      --init "$R/stsb/fp-t-ft/best.pt" --out "$R/stsb/$w-kd"
  spikesim train "${common[@]}" --weights $w --stage finetune --max-steps 360 --eval-every 180 --eval-timesteps 80 \
      --init "$R/stsb/$w-kd/last.pt" --out "$R/stsb/$w-ft"
done
