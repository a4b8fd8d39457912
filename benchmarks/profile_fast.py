"""Where the fast engine's time goes on CUDA: a kernel table of one run, and variants timed.

    python benchmarks/profile_fast.py --batch 32 --timesteps 80 [--weights ternary] [--variants]

Prints the CUDA kernels by total time (torch.profiler), then one JSON line per variant (scan
block shapes, operand, attention precision) with the fast engine's sequence-timesteps/s, and the
spike mismatch between the reference engine in float32 and in float64 (rounding alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import build  # noqa: E402

from spikingbert_sim import kernels  # noqa: E402
from spikingbert_sim.engine import EngineOptions, simulate_multistep, spike_mismatch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--timesteps", type=int, default=80)
    p.add_argument("--weights", default="ternary")
    p.add_argument("--variants", action="store_true")
    p.add_argument("--calibrate", action="store_true", help="reference float32 vs float64 spike mismatch")
    a = p.parse_args()
    model, L = build("paper", a.weights, None)
    model = model.cuda()
    ids = torch.randint(5, 30000, (a.batch, L), generator=torch.Generator().manual_seed(1)).cuda()
    T = a.timesteps

    def run(opts=EngineOptions()):
        return simulate_multistep(model, ids, None, timesteps=T, options=opts)

    def rate(opts=EngineOptions(), n=5):
        run(opts)
        times = []
        for _ in range(n):
            torch.cuda.synchronize()
            t = time.perf_counter()
            run(opts)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return a.batch * T / statistics.median(times)

    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    def dev_time(e):
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, name):
                return getattr(e, name)
        return 0.0

    events = sorted(prof.key_averages(), key=dev_time, reverse=True)
    total = sum(dev_time(e) for e in events)
    print(json.dumps({"kernels_ms": {e.key[:70]: [round(dev_time(e) / 1e3, 3), e.count] for e in events[:12]},
                      "total_device_ms": round(total / 1e3, 3)}))
    print(json.dumps({"variant": "default", "seq_steps_per_s": rate()}))
    if a.variants:
        base = kernels.scan_blocks
        kernels.SCAN_COUNTS = "atomic"
        print(json.dumps({"variant": "atomic counts", "seq_steps_per_s": rate(n=3)}))
        kernels.SCAN_COUNTS = "partial"
        shapes = {"plain": [(8, 256, 4), (16, 128, 4), (8, 512, 8)], "norm": [(4, 1024, 8)]}
        for kind, variants in shapes.items():
            for v in variants:
                def blocks(width, norm, v=v, kind=kind):
                    if (kind == "norm") == norm:
                        return v if not norm or v[1] >= width else base(width, norm)
                    return base(width, norm)
                kernels.scan_blocks = blocks
                try:
                    print(json.dumps({"variant": f"{kind} {v}", "seq_steps_per_s": rate(n=3)}))
                except Exception as exc:
                    print(json.dumps({"variant": f"{kind} {v}", "error": str(exc)[:200]}))
                kernels.scan_blocks = base
        for opts in (EngineOptions(operand="int8"), EngineOptions(attention="fp32")):
            print(json.dumps({"variant": str(opts), "seq_steps_per_s": rate(opts, n=3)}))
    if a.calibrate:
        n = min(a.batch, 8)
        m64 = build("paper", a.weights, None)[0].double().cuda()
        r = spike_mismatch(model, ids[:n], None, T, other=m64)
        print(json.dumps({"calibration": "reference fp32 vs fp64", "batch": n, "mismatch": r["mismatch"],
                          "fraction": r["mismatch"] / r["slots"]}))
        for att in ("fp32", "bf16"):
            r = spike_mismatch(model, ids[:n], None, T, EngineOptions(attention=att))
            print(json.dumps({"calibration": f"fused ({att} attention) vs reference fp32", "batch": n,
                              "mismatch": r["mismatch"], "fraction": r["mismatch"] / r["slots"],
                              "first_sites": {k: v for k, v in list(r["per_site"].items())[:8]}}))


if __name__ == "__main__":
    main()
