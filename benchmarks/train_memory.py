"""Peak memory of one training step (forward + backward) vs. simulation time steps T:
equilibrium gradients (SPEC §5) against backpropagation through time.

    python benchmarks/train_memory.py --timesteps 8 16 32 64 [--config tiny|small|paper]
        [--device cpu|cuda] [--batch B] [--length L] [--weights fp|binary|ternary]

Prints one JSON object. The step is the fine-tuning step of ``spikesim train`` without the
optimizer update: simulate / unroll T steps of a spiking BERT (random weights, seeded), take the
cross-entropy of the logits, and backpropagate into every parameter.

How memory is measured (the ``measure`` field says which):

* CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the memory allocated before
  it (model and batch), after ``reset_peak_memory_stats``.
* CPU: every (method, T) point runs in a fresh Python process (so no allocator cache or earlier
  peak is shared). That process builds the model and batch, runs one warm-up step, resets the
  kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0), runs the measured step
  and reports ``VmHWM − VmRSS-before`` from ``/proc/self/status``. glibc's malloc is pinned to
  ``mmap`` for blocks ≥ 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident
  set and RSS follows live memory.
* Both: ``saved_tensor_bytes``, the bytes autograd keeps for the backward pass, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` — the part of the peak that BPTT multiplies by T.

Targets (SPEC §5): the equilibrium step's peak stays within 10 % from the smallest to the largest
T; BPTT needs ≥ 10× more at T = 64.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

CONFIGS = {
    # name: model shape, default batch and tokens per sequence
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, batch=8, length=32),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, batch=8,
                  length=64),
    "paper": dict(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072, batch=8,
                  length=128),
}
METHODS = ("equilibrium", "bptt")


def build(config: str, weights: str, batch: int, length: int, device: str):
    import torch

    from spikingbert_sim.config import SpikingBertConfig
    from spikingbert_sim.model import SpikingBertForSequenceClassification

    shape = {k: v for k, v in CONFIGS[config].items() if k not in ("batch", "length")}
    torch.manual_seed(0)
    cfg = SpikingBertConfig(vocab_size=1000, max_position_embeddings=max(512, length), weight_mode=weights, **shape)
    model = SpikingBertForSequenceClassification(cfg).to(device)
    with torch.no_grad():  # BERT-like weight scale for a trained model: neurons fire at varied rates
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("embeddings"):
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[: batch // 2, length * 3 // 4:] = 0  # some padding, as in real batches
    labels = torch.randint(0, 2, (batch,), generator=g).to(device)
    return model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, labels


def one_step(model, batch, labels, method: str, timesteps: int, time_chunk: int | None) -> int:
    """Forward + backward; returns the bytes autograd saved for the backward."""
    import torch
    import torch.nn.functional as F

    from spikingbert_sim.equilibrium import student_forward

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student_forward(model, batch, method, timesteps, time_chunk=time_chunk)
        loss = F.cross_entropy(out.logits, labels)
    loss.backward()
    return saved[0]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    """One CPU measurement in this (fresh) process; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    model, batch, labels = build(args.config, args.weights, args.batch, args.length, "cpu")
    one_step(model, batch, labels, args.method, args.child_T, args.time_chunk)  # warm-up: lazy inits, grads
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    saved = one_step(model, batch, labels, args.method, args.child_T, args.time_chunk)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    print(json.dumps({"peak_bytes": peak, "saved_tensor_bytes": saved, "step_seconds": round(seconds, 4)}))


def measure_cpu(args, method: str, T: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", method, "--_T", str(T), "--config", args.config,
           "--batch", str(args.batch), "--length", str(args.length), "--weights", args.weights,
           "--threads", str(args.threads)] + (["--time-chunk", str(args.time_chunk)] if args.time_chunk else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measurement {method} T={T} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_cuda(args, method: str, T: int, cache: dict) -> dict:
    import torch

    if "model" not in cache:
        cache["model"], cache["batch"], cache["labels"] = build(args.config, args.weights, args.batch, args.length,
                                                                "cuda")
        one_step(cache["model"], cache["batch"], cache["labels"], method, 2, args.time_chunk)  # warm-up
    model, batch, labels = cache["model"], cache["batch"], cache["labels"]
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    saved = one_step(model, batch, labels, method, T, args.time_chunk)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "saved_tensor_bytes": saved,
            "step_seconds": round(seconds, 4)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, nargs="+", default=[8, 16, 32, 64], help="values of T")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small",
                   help="model size (tiny is a smoke test: its tensors are too small for RSS to resolve)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=None, help="sequences per step [config default]")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence [config default]")
    p.add_argument("--weights", choices=["fp", "binary", "ternary"], default="ternary")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--time-chunk", type=int, default=None,
                   help="steps simulated at once by the equilibrium measurement [engine's plan on CPU, 8 on CUDA]")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="CPU threads")
    p.add_argument("--_child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--_T", dest="child_T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or CONFIGS[args.config]["batch"]
    args.length = args.length or CONFIGS[args.config]["length"]
    if args._child:
        args.method = args._child
        child(args)
        return
    if any(T <= 0 for T in args.timesteps):
        p.error("--timesteps must be positive")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available")
    results: dict[str, dict[str, dict]] = {m: {} for m in args.methods}
    cache: dict = {}
    for method in args.methods:
        for T in args.timesteps:
            try:
                r = measure_cuda(args, method, T, cache) if args.device == "cuda" else measure_cpu(args, method, T)
            except torch.OutOfMemoryError:  # recorded, not fatal: BPTT at large T is expected to run out
                if "model" in cache:
                    cache["model"].zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                results[method][str(T)] = {"out_of_memory": True}
                print(f"{method:>11} T={T:<4} out of memory", file=sys.stderr)
                continue
            results[method][str(T)] = r
            print(f"{method:>11} T={T:<4} peak {r['peak_bytes'] / 2**20:9.1f} MiB  saved "
                  f"{r['saved_tensor_bytes'] / 2**20:9.1f} MiB  {r['step_seconds']:.3f} s", file=sys.stderr)
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "measure": ("torch.cuda.max_memory_allocated() minus allocated before the step" if args.device == "cuda"
                    else "peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS before the step, fresh process "
                         "per point, malloc mmap threshold 128 KiB"),
        "step": "forward + backward of cross-entropy on the logits (no optimizer update)",
        "config": {"name": args.config, **{k: v for k, v in CONFIGS[args.config].items() if k not in ("batch", "length")},
                   "weights": args.weights},
        "batch": args.batch, "tokens": args.length, "time_chunk": args.time_chunk, "torch": torch.__version__,
        "results": results,
    }
    def ratio(T: str):
        b, e = results["bptt"].get(T, {}), results["equilibrium"].get(T, {})
        if "peak_bytes" not in e:
            return None
        if b.get("out_of_memory"):
            return "bptt out of memory"
        return round(b["peak_bytes"] / max(1, e["peak_bytes"]), 2) if "peak_bytes" in b else None

    if "equilibrium" in results and "bptt" in results:
        report["ratio_bptt_over_equilibrium"] = {T: ratio(T) for T in results["equilibrium"]}
    if "equilibrium" in results:
        peaks = [r["peak_bytes"] for r in results["equilibrium"].values() if "peak_bytes" in r]
        spread = (max(peaks) - min(peaks)) / max(1, min(peaks)) if peaks else None
        report["equilibrium_peak_spread"] = round(spread, 4) if spread is not None else None
        report["targets"] = {"equilibrium_flat_within_10pct": spread is not None and spread <= 0.10}
        if "bptt" in results and "64" in results["bptt"]:
            r64 = report["ratio_bptt_over_equilibrium"]["64"]
            report["targets"]["bptt_at_least_10x_at_T64"] = isinstance(r64, str) or (r64 is not None and r64 >= 10)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
