#!/usr/bin/env bash
# The exact commands behind the CoLA students in the README and results/README.md (seed 42, 2-core CPU, torch 2.13.0+cpu;
# every step resumes after a kill). First run: OMP_NUM_THREADS=1 beside one other training job,
# ~0.7 s (CoLA) to 1.1 s (with SST-2) per step (results/cola/1thread/). The README's numbers: steps 1, 2,
# 4 and 5 re-run with OMP_NUM_THREADS=2 as the only job, 0.5 s per step, 58 min (results/cola/rerun.log).
#   bash examples/reproduce_cola.sh [OUT_DIR]      (default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
G=${DATA:-../shared/glue}
R=${1:-runs}
TE=$R/teachers/cola
# 1. teacher: the offline MiniLM-L6-H384 fine-tuned on CoLA (8,551 sentences; 3 epochs; Matthews 27.5)
[ -f "$TE/teacher_summary.json" ] || \
  spikesim teacher --task cola --data "$G" --epochs 3 --lr 5e-5 --batch-size 32 --seed 42 --out "$TE"
common=(--task cola --data "$G" --teacher "$TE" --batch-size 32 --seed 42 --lr 1e-4 --method steady_state --resume)
kd_eval=(--eval-every 1000000 --eval-timesteps 8 --eval-limit 64)   # the kd stage's classifier is untrained
# 2. full-precision student from the teacher's layers: intermediate KD (1 epoch, 267 steps), soft-label KD (2 epochs)
spikesim train "${common[@]}" --weights fp --stage kd --max-steps 267 "${kd_eval[@]}" --out "$R/cola/fp-kd"
spikesim train "${common[@]}" --weights fp --stage predict --max-steps 534 --eval-every 267 --eval-timesteps 80 \
    --init "$R/cola/fp-kd/last.pt" --out "$R/cola/fp-pred"
# 3. the same with SST-2's 67,349 sentences (labels unused) as a transfer set, 1,000 steps a stage
tr=(--transfer sst2)
spikesim train "${common[@]}" "${tr[@]}" --weights fp --stage kd --max-steps 1000 "${kd_eval[@]}" --out "$R/cola/fp-t-kd"
spikesim train "${common[@]}" "${tr[@]}" --weights fp --stage predict --max-steps 1000 --eval-every 500 --eval-timesteps 80 \
    --init "$R/cola/fp-t-kd/last.pt" --out "$R/cola/fp-t-pred"
# 4. fine-tuning on the true labels (the paper's last stage) from step 2's student, 4 epochs (0.5 s/step)
spikesim train "${common[@]}" --weights fp --stage finetune --max-steps 1068 --eval-every 267 --eval-timesteps 80 \
    --init "$R/cola/fp-pred/last.pt" --out "$R/cola/fp-ft"
# 5. 1.58-bit and 1-bit students from step 4's best: intermediate KD (1 epoch), then fine-tuning (2 epochs)
for w in ternary binary; do
  spikesim train "${common[@]}" --weights $w --stage kd --max-steps 267 "${kd_eval[@]}" \
      --init "$R/cola/fp-ft/best.pt" --out "$R/cola/$w-kd"
  spikesim train "${common[@]}" --weights $w --stage finetune --max-steps 534 --eval-every 267 --eval-timesteps 80 \
      --init "$R/cola/$w-kd/last.pt" --out "$R/cola/$w-ft"
done
