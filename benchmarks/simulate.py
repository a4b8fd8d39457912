"""Benchmark: reference (per-step) engine vs fast (multi-step) engine, measured in the same run.

Prints ONE JSON object: sequence-timesteps per second of each engine, their ratio, the number of
spike slots where the two engines' spikes differ, and on CUDA the measured matrix-product peaks
(bf16, fp8, int8) and the share of the peak that the fast engine's products reach.

    python benchmarks/simulate.py --device cpu --config tiny --batch 8 --timesteps 80
    python benchmarks/simulate.py --device cuda --config paper --batch 32 --timesteps 80 --weights ternary

The model has random weights scaled like the test suite's (N(0, 4/fan_in), so that every site
fires at 10-40 %), binary/ternary layers frozen to their int8 inference form, and full-length
sequences (no padding) unless ``--pad`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikingbert_sim import kernels, native  # noqa: E402
from spikingbert_sim.config import SpikingBertConfig  # noqa: E402
from spikingbert_sim.engine import EngineOptions, simulate_multistep, spike_mismatch  # noqa: E402
from spikingbert_sim.model import SpikingBertForSequenceClassification  # noqa: E402
from spikingbert_sim.quantization import QuantLinear  # noqa: E402
from spikingbert_sim.simulation import simulate  # noqa: E402

CONFIGS = {
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=128, seq_len=32),
    "paper": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=512, seq_len=128),
}


def build(config: str, weights: str, hidden: int | None, seed: int = 0) -> tuple[SpikingBertForSequenceClassification, int]:
    c = dict(CONFIGS[config])
    seq_len = c.pop("seq_len")
    if hidden:
        c.update(hidden_size=hidden, intermediate_size=4 * hidden)
    torch.manual_seed(seed)
    model = SpikingBertForSequenceClassification(SpikingBertConfig(**c, weight_mode=weights))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (QuantLinear, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 2.0 / m.weight.shape[1] ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    model.freeze_quantized()
    return model.eval(), seq_len


@contextlib.contextmanager
def environment(name: str, value: str):
    """``os.environ[name] = value`` inside the block, the previous state back after it, whatever happened."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def matmul_peaks(device: str, n: int = 8192) -> dict[str, float]:
    """TFLOP/s (TOP/s) of large square products: bf16 (torch.mm), fp8 e4m3 (torch._scaled_mm), int8
    (torch._int_mm). Random 0/±1 operands; median of 10 after 3 warm-ups, timed with CUDA events."""
    peaks = {}
    a = torch.randint(-1, 2, (n, n), device=device)
    b = torch.randint(-1, 2, (n, n), device=device)
    one = torch.ones((), device=device)
    variants = {
        "bf16": (lambda x, y: torch.mm(x, y), a.bfloat16(), b.bfloat16().t()),
        "fp8": (lambda x, y: torch._scaled_mm(x, y, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()),
        "int8": (lambda x, y: torch._int_mm(x, y), a.to(torch.int8), b.to(torch.int8).t()),
    }
    for name, (f, x, y) in variants.items():
        try:
            for _ in range(3):
                f(x, y)
            times = []
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                f(x, y)
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            peaks[name] = 2 * n ** 3 / statistics.median(times) / 1e12
        except Exception as exc:  # pragma: no cover - depends on the GPU
            peaks[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
    return peaks


PRODUCT_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_int_mm")


def product_time_cpu(fn) -> tuple[float, float]:
    """(seconds in matrix products, seconds in all operators) of one run of ``fn`` on the CPU, by
    torch.profiler's self times (the products' share of the run; the profiler's own per-operator
    overhead falls on the many small element-wise operators, so the share is a lower bound)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCT_OPS)
    return products / 1e6, total / 1e6


def native_times(fn) -> dict[str, float]:
    """Seconds that one run of ``fn`` spends in each compiled kernel (:func:`native.scan`, with the
    binary/ternary products that neurons sum themselves; :func:`native.accumulate`;
    :func:`native.affine`), which the profiler does not see: they are not PyTorch operators."""
    spent = {name: 0.0 for name in ("scan", "accumulate", "affine")}
    originals = {name: getattr(native, name) for name in spent}

    def timed_kernel(name):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t
        return run

    for name in spent:
        setattr(native, name, timed_kernel(name))
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(native, name, original)
    return spent


def cpu_matmul_peaks(n: int = 2048) -> dict[str, float | str]:
    """GFLOP/s of an n³ product on the CPU with the current thread count: fp32 and, where the fast
    engine's exact spike products run in bf16 here (:func:`kernels.cpu_spike_product`), bf16
    operands (elsewhere a bf16 product of this size would take minutes). Median of 5 after 1 warm-up."""
    peaks: dict[str, float | str] = {}
    formats = [("fp32", torch.float32)]
    if kernels.cpu_spike_product() == "bf16":
        formats.append(("bf16", torch.bfloat16))
    else:
        peaks["bf16"] = "not measured: the engine's exact products do not run in bf16 on this CPU"
    for name, dtype in formats:
        x = torch.randint(-1, 2, (n, n)).to(dtype)
        y = torch.randint(-1, 2, (n, n)).to(dtype)
        torch.mm(x, y)
        peaks[name] = 2 * n ** 3 / statistics.median(timed(lambda: torch.mm(x, y), "cpu", 5)) / 1e9
    return peaks


def flops_per_sequence_step(model: SpikingBertForSequenceClassification, L: int) -> tuple[float, float]:
    """(linear-layer FLOPs, attention FLOPs) of one sequence for one time step."""
    c = model.config
    D, I = c.hidden_size, c.intermediate_size
    linear = 2 * L * (4 * D * D + 2 * D * I) * c.num_hidden_layers
    attention = 2 * 2 * L * L * D * c.num_hidden_layers
    return float(linear), float(attention)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--timesteps", type=int, default=80)
    p.add_argument("--weights", choices=["fp", "binary", "ternary"], default="ternary")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the config's)")
    p.add_argument("--hidden", type=int, default=None, help="override hidden size (intermediate = 4x)")
    p.add_argument("--backend", default="auto", help="fast engine backend: auto | torch | fused")
    p.add_argument("--operand", default="auto", help="spike-product format: auto | fp8 | int8 | bf16 | fp32")
    p.add_argument("--attention", default="auto", help="fused attention: auto | bf16 | fp32")
    p.add_argument("--compare-operands", default="", help="comma-separated operands to time the fast engine with too")
    p.add_argument("--chunk-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per engine (default 5 fast, 2 reference)")
    p.add_argument("--pad", type=float, default=0.0, help="pad this share of each sequence's tail in half the batch")
    p.add_argument("--no-mismatch", action="store_true", help="skip the spike-by-spike comparison")
    p.add_argument("--profile", action="store_true",
                   help="CPU: also report the fast engine's time in matrix products, the speed-up it would "
                        "reach if everything else were free, and the CPU's measured product peak")
    p.add_argument("--compare-native", action="store_true",
                   help="CPU: also time the fast engine with the compiled scan switched off (PyTorch's scan)")
    p.add_argument("--compare-products", default=None, metavar="LIST",
                   help="CPU, binary/ternary: also time the fast engine with each of these exact spike products "
                        "(comma-separated: bf16, accumulate, float; SPIKINGBERT_CPU_PRODUCT)")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    a = p.parse_args(argv)
    if a.profile and a.device != "cpu":
        p.error("--profile is for --device cpu (on CUDA, benchmarks/profile_fast.py lists the kernels)")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    model, L = build(a.config, a.weights, a.hidden)
    L = a.seq_len or L
    model = model.to(dev)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (a.batch, L), generator=g)
    mask = torch.ones_like(ids)
    if a.pad:
        cut = max(1, int(round(L * (1 - a.pad))))
        mask[: a.batch // 2, cut:] = 0
        ids[mask == 0] = 0
    ids, mask = ids.to(dev), mask.to(dev)
    T = a.timesteps
    opts = EngineOptions(backend=a.backend, operand=a.operand, attention=a.attention, chunk_steps=a.chunk_steps)

    def fast(options=opts):
        return simulate_multistep(model, ids, mask, timesteps=T, options=options)

    def ref():
        return simulate(model, ids, mask, timesteps=T, engine="reference")

    fast_repeats = a.repeats or 5
    ref_repeats = a.repeats or 2
    fast()  # warm-up: Triton compilation, cuBLAS handles, allocator
    ref()
    # alternate the engines so that both see the same machine conditions
    t_fast, t_ref = [], []
    for i in range(max(fast_repeats, ref_repeats)):
        if i < ref_repeats:
            t_ref += timed(ref, dev, 1)
        if i < fast_repeats:
            t_fast += timed(fast, dev, 1)
    seq_steps = a.batch * T
    result = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "config": a.config, "hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
        "intermediate": model.config.intermediate_size, "heads": model.config.num_attention_heads,
        "batch": a.batch, "timesteps": T, "seq_len": L, "weights": a.weights, "padded": bool(a.pad),
        "options": {"backend": a.backend, "operand": a.operand, "attention": a.attention, "chunk_steps": a.chunk_steps},
        "reference_seq_steps_per_s": seq_steps / statistics.median(t_ref),
        "fast_seq_steps_per_s": seq_steps / statistics.median(t_fast),
        "fast_seq_per_s": a.batch / statistics.median(t_fast),
        "speedup": statistics.median(t_ref) / statistics.median(t_fast),
        "reference_times_s": [round(x, 5) for x in t_ref],
        "fast_times_s": [round(x, 5) for x in t_fast],
    }
    r_fast, r_ref = fast(), ref()
    result["logits_max_abs_diff"] = float((r_fast.logits - r_ref.logits).abs().max())
    result["spike_count_fast"] = r_fast.total_spikes()
    result["spike_count_reference"] = r_ref.total_spikes()
    if not a.no_mismatch:
        mm = spike_mismatch(model, ids, mask, T, opts)
        result["spike_mismatch"] = mm["mismatch"]
        result["spike_slots"] = mm["slots"]
        result["spike_mismatch_fraction"] = mm["mismatch"] / mm["slots"]
        result["spike_mismatch_per_site"] = {k: v for k, v in mm["per_site"].items() if v}
    for operand in [o for o in a.compare_operands.split(",") if o]:
        o = EngineOptions(backend=a.backend, operand=operand, attention=a.attention, chunk_steps=a.chunk_steps)
        try:
            fast(o)
            times = timed(lambda: fast(o), dev, fast_repeats)
            result.setdefault("fast_seq_steps_per_s_by_operand", {})[operand] = seq_steps / statistics.median(times)
        except Exception as exc:
            result.setdefault("fast_seq_steps_per_s_by_operand", {})[operand] = f"failed: {exc}"[:200]
    if dev == "cpu":
        result["native_scan"] = native.available()
        result["cpu_spike_product"] = kernels.cpu_spike_product()
        result["malloc_tuned"] = native.tune_malloc()  # applied by the first fast run, before any timing
        if a.compare_native and native.available():
            native._library.cache_clear()
            try:
                with environment("SPIKINGBERT_NATIVE", "0"):
                    fast()
                    times = timed(fast, dev, fast_repeats)
            finally:  # the compiled scan back on, whatever happened
                native._library.cache_clear()
            result["fast_without_native_seq_steps_per_s"] = seq_steps / statistics.median(times)
            result["native_speedup"] = statistics.median(times) / statistics.median(t_fast)
    if dev == "cpu" and a.compare_products:
        for choice in [c.strip() for c in a.compare_products.split(",") if c.strip()]:
            try:
                with environment("SPIKINGBERT_CPU_PRODUCT", choice):
                    fast()
                    times = timed(fast, dev, fast_repeats)
                result.setdefault("fast_seq_steps_per_s_by_cpu_product", {})[choice] = seq_steps / statistics.median(times)
            except Exception as exc:
                result.setdefault("fast_seq_steps_per_s_by_cpu_product", {})[choice] = f"failed: {exc}"[:200]
    lin, att = flops_per_sequence_step(model, L)
    if a.profile:
        kernels_s = native_times(fast)
        result["fast_native_scan_s"] = kernels_s["scan"]
        result["fast_native_accumulate_s"] = kernels_s["accumulate"]
        result["fast_native_affine_s"] = kernels_s["affine"]
        products_s, profiled_s = product_time_cpu(fast)
        result["fast_product_s"] = products_s
        result["fast_profiled_s"] = profiled_s
        result["fast_product_share"] = products_s / profiled_s
        result["fast_product_gflops"] = (lin + att) * seq_steps / products_s / 1e9
        result["speedup_bound_products_only"] = statistics.median(t_ref) / products_s
        ref_products_s, ref_profiled_s = product_time_cpu(ref)
        result["reference_product_s"] = ref_products_s
        result["reference_product_share"] = ref_products_s / ref_profiled_s
        result["cpu_matmul_peak_gflops"] = cpu_matmul_peaks()
    if dev == "cuda":
        rate = (lin + att) * seq_steps / statistics.median(t_fast) / 1e12
        peaks = matmul_peaks(dev)
        from spikingbert_sim.engine import resolve_operand
        operand = resolve_operand(opts, a.weights)
        peak_key = operand if operand in peaks else "bf16"
        result["fast_tflops"] = rate
        result["matmul_peak_tflops"] = peaks
        if isinstance(peaks.get(peak_key), float):
            result["fraction_of_peak"] = rate / peaks[peak_key]
            result["fraction_of_peak_operand"] = peak_key
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    text = json.dumps(result)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
