#!/usr/bin/env bash
# GPU measurements on the device machine: CUDA tests, kernel breakdown, GPU benchmarks, and the CPU
# benchmark pinned to 2 cores of the (otherwise idle) device machine. Results land in $OUT.
#   bash benchmarks/run_gpu_final.sh [gpu|cpu|all]
set -u
what=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/machine.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee -a "$OUT/machine.txt"
b() { name=$1; shift; echo "== $name: $*"; timeout 200 "$@" --out "/tmp/$name.json" 2>&1 | tail -1 | cut -c1-400; [ -f "/tmp/$name.json" ] && sed "s/^{/{\"run\": \"$name\", /" "/tmp/$name.json" >> "$OUT/bench.jsonl"; }
if [ "$what" != cpu ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine.py -k cuda 2>&1 | tail -2 | tee -a "$OUT/machine.txt"
  timeout 120 python3 benchmarks/profile_fast.py --batch 32 2>&1 | grep -E "kernels_ms|variant" | tee "$OUT/profile.txt"
  b gpu_paper32_ternary python3 benchmarks/simulate.py --device cuda --config paper --batch 32 --timesteps 80 --repeats 7 --compare-operands int8
  b gpu_paper64_ternary python3 benchmarks/simulate.py --device cuda --config paper --batch 64 --timesteps 80 --no-mismatch --repeats 5
  b gpu_paper128_ternary python3 benchmarks/simulate.py --device cuda --config paper --batch 128 --timesteps 80 --no-mismatch --repeats 5 --compare-operands int8
fi
if [ "$what" != gpu ]; then
  for w in ternary binary fp; do
    b cpu_tiny_$w taskset -c 0,1 python3 benchmarks/simulate.py --device cpu --config tiny --batch 8 --timesteps 80 --threads 2 --weights $w
  done
  b cpu_tiny128_ternary taskset -c 0,1 python3 benchmarks/simulate.py --device cpu --config tiny --batch 8 --timesteps 80 --threads 2 --hidden 128
fi
