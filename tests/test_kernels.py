"""Kernels of the multi-step engine: the torch definitions are exact, the CUDA kernels match them.

CPU tests check the logic that the CUDA path relies on (scan definition == if_scan, exact integer
spike products in low precision); CUDA tests (skipped without a GPU) check the Triton scan and the
cuBLAS spike products against those definitions; one test runs the Triton kernel in Triton's CPU
interpreter when Triton is installed.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from spikingbert_sim import kernels
from spikingbert_sim.neurons import if_scan
from spikingbert_sim.quantization import QuantLinear, quantize

from conftest import needs_triton

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- the scan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold, leak", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.95)])
def test_scan_torch_equals_if_scan_bitwise(dtype, threshold, leak):
    cur = (torch.randn(20, 3, 5, 7, generator=gen(1)) * 0.8 + 0.3).to(dtype)
    mem0 = torch.randn(3, 5, 7, generator=gen(2)).to(dtype) * 0.5
    want_s, want_m = if_scan(cur, threshold, leak, mem0.clone())
    got_s, got_m = kernels.scan_torch(cur, threshold, leak, mem0)
    assert torch.equal(got_s, want_s) and torch.equal(got_m, want_m)
    assert 0.05 < float(got_s.mean()) < 0.95
    # the initial membrane is not modified, and a stride-0 constant current works
    assert torch.equal(mem0, torch.randn(3, 5, 7, generator=gen(2)).to(dtype) * 0.5)
    const = cur[0].expand(20, *cur.shape[1:])
    assert torch.equal(kernels.scan_torch(const, threshold, leak)[0], if_scan(const.clone(), threshold, leak)[0])


def test_scan_reference_statistics_and_chunks():
    T, R, W = 12, 6, 10
    cur = torch.randn(T, R, W, generator=gen(3)) + 0.4
    valid = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.float32)
    leak = 0.9
    whole = kernels.ScanState(R, W, T, "cpu")
    spikes = kernels.scan_reference(cur, whole, valid=valid, leak=leak)
    want, _ = if_scan(cur, 1.0, leak)
    assert torch.equal(spikes, want)
    assert torch.equal(whole.counts, (want * valid.view(1, -1, 1)).sum((1, 2)).to(torch.int32))
    acc = torch.zeros(R, W)
    for s in want:
        acc = leak * acc + s
    assert torch.equal(whole.weighted, acc)
    # two chunks carry membrane, counts and ASR numerator: same as one pass
    parts = kernels.ScanState(R, W, T, "cpu")
    a = kernels.scan_reference(cur[:5], parts, t0=0, valid=valid, leak=leak)
    b = kernels.scan_reference(cur[5:], parts, t0=5, valid=valid, leak=leak)
    assert torch.equal(torch.cat([a, b]), spikes)
    for name in ("mem", "weighted", "counts"):
        assert torch.equal(getattr(parts, name), getattr(whole, name)), name


def test_scan_reference_constant_current_and_no_state():
    emb = torch.randn(4, 8, generator=gen(4)) + 0.5
    st = kernels.ScanState(4, 8, 6, "cpu")
    s = kernels.scan_reference(emb, st, timesteps=6)
    assert torch.equal(s, if_scan(emb.expand(6, 4, 8).clone())[0])
    q = kernels.scan_reference(emb.expand(3, 4, 8), None, scale=torch.full((8,), 0.5), bias=torch.ones(8),
                               out_dtype=torch.float64)
    assert q.dtype == torch.float64 and torch.equal(q[1], (emb * 0.5 + 1).double())


def test_epilogue_matches_quantlinear_rounding_bitwise():
    """The fused scan's ``acc·scale + bias`` on an exact integer accumulator is the current a frozen
    QuantLinear computes, bit for bit (float32), for every output column."""
    lin = QuantLinear(48, 24, mode="ternary")
    with torch.no_grad():
        lin.weight.normal_(generator=gen(5))
        lin.bias.normal_(generator=gen(6))
    lin.freeze()
    x = (torch.rand(30, 48, generator=gen(7)) < 0.3).float()
    with torch.no_grad():
        want = lin(x)
    acc = kernels.spike_matmul_reference(x, lin.qweight).float()
    got = kernels.epilogue_torch(acc, scale=lin.scale.expand(24), bias=lin.bias)
    assert torch.equal(got, want)


def test_scan_blocks_hold_whole_rows_for_layernorm():
    for width in (16, 64, 768, 1000, 3072):
        br, bw, nw = kernels.scan_blocks(width, norm=True)
        assert bw >= width and bw & (bw - 1) == 0 and br >= 1 and nw in (4, 8)
        br, bw, _ = kernels.scan_blocks(width, norm=False)
        assert bw <= 256 and br * bw <= 4096 * 2


# --- exact spike products ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_low_precision_formats_hold_spikes_and_weights_exactly(mode):
    values, _ = quantize(torch.randn(40, 64, generator=gen(8)), mode)
    spikes = (torch.rand(50, 64, generator=gen(9)) < 0.4).float()
    for dt in (torch.float8_e4m3fn, torch.int8, torch.bfloat16, torch.float16):
        assert torch.equal(values.to(dt).float(), values), dt
        assert torch.equal(spikes.to(dt).float(), spikes), dt
    # fp16 holds every integer up to 2048: an fp16 accumulator output is exact while K <= 2048
    n = torch.arange(-2048, 2049, dtype=torch.float32)
    assert torch.equal(n.half().float(), n)
    assert float(torch.tensor(2049.0).half()) != 2049.0
    # bf16 holds every integer up to 256 (EXACT_BF16_K)
    n = torch.arange(-kernels.EXACT_BF16_K, kernels.EXACT_BF16_K + 1, dtype=torch.float32)
    assert torch.equal(n.bfloat16().float(), n)
    assert float(torch.tensor(257.0).bfloat16()) != 257.0


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_int8_product_emulation_equals_float64_linear(mode):
    """What torch._int_mm / torch._scaled_mm compute (an exact integer sum of int8 / fp8 products)
    equals F.linear in float64 on the same spikes and weights."""
    values, _ = quantize(torch.randn(32, 96, generator=gen(10)), mode)
    spikes = (torch.rand(40, 96, generator=gen(11)) < 0.5).double()
    want = F.linear(spikes, values.double())
    int_sum = (spikes.to(torch.int8).to(torch.int32) @ values.to(torch.int8).to(torch.int32).T)
    assert torch.equal(int_sum.double(), want)
    assert torch.equal(kernels.spike_matmul_reference(spikes.to(torch.float8_e4m3fn), values.to(torch.float8_e4m3fn)), want)
    assert torch.equal(kernels.spike_matmul(spikes.to(torch.int8), values.to(torch.int8), "int8").double(), want)


def test_cublas_shape_rules():
    assert kernels.cublas_shape_ok("fp8", 5, 768, 3072) and not kernels.cublas_shape_ok("fp8", 64, 40, 64)
    assert kernels.cublas_shape_ok("int8", 17, 8, 16) and not kernels.cublas_shape_ok("int8", 16, 8, 16)
    assert not kernels.cublas_shape_ok("int8", 64, 12, 16) and kernels.cublas_shape_ok("bf16", 1, 3, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [64, 256, 300, 600])
@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_exact_product_cpu_equals_linear_bitwise(dtype, K, mode):
    values, _ = quantize(torch.randn(24, K, generator=gen(12)), mode)
    for spikes in ((torch.rand(2, 35, K, generator=gen(13)) < 0.3).to(dtype), torch.ones(2, 35, K, dtype=dtype)):
        got = kernels.exact_product_cpu(spikes, values.to(torch.bfloat16))
        assert got.dtype == dtype
        assert torch.equal(got, F.linear(spikes, values.to(dtype)))
        # the engine hands it bf16 spikes (and asks for its dtype): the slices' sum stays exact
        low = spikes.to(torch.bfloat16)
        got = kernels.exact_product_cpu(low, values.to(torch.bfloat16), low, acc_dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, F.linear(spikes, values.to(dtype)))
    # the all-ones worst case really exceeds what one bf16 output could hold (K = 301: a bf16 sum
    # of the slices would round it to 300 or 302)
    if mode == "binary" and K > 256:
        for n in (K, 301):
            ones = torch.ones(1, n, dtype=dtype)
            plus = torch.ones(1, n)
            assert float(kernels.exact_product_cpu(ones, plus.bfloat16())) == n
            assert float(kernels.exact_product_cpu(ones.bfloat16(), plus.bfloat16())) == n


# --- Triton interpreter (when Triton is installed) ----------------------------------------------

@needs_triton
def test_triton_scan_kernel_in_interpreter_matches_definition():
    code = textwrap.dedent("""
        import torch
        from spikingbert_sim import kernels as K
        g = torch.Generator().manual_seed(0)
        T, R, W = 5, 10, 48
        cur = torch.randn(T, R, W + 16, generator=g)[..., 8:8 + W]  # a column slice: strided rows
        valid = (torch.rand(R, generator=g) < 0.7).float()
        res = (torch.rand(T, R, W, generator=g) < 0.3).to(torch.int8)
        norm = (torch.randn(W, generator=g), torch.randn(W, generator=g), 1e-12)
        cases = [dict(), dict(scale=torch.full((W,), 0.7), bias=torch.randn(W, generator=g)),
                 dict(scale=torch.full((W,), 0.7), bias=torch.randn(W, generator=g), residual=res, norm=norm)]
        for kw in cases:
            outs = []
            for fn in (K.scan_reference, K.scan):
                st = K.ScanState(R, W, T + 2, "cpu")
                st.mem += 0.3
                o = fn(cur, st, t0=2, valid=valid, out_dtype=torch.int8, leak=0.9, **kw)
                outs.append((o, st.mem, st.counts, st.weighted))
            (a, *sa), (b, *sb) = outs
            assert torch.equal(a, b) and torch.equal(sa[1], sb[1]), kw.keys()
            assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(sa, sb))
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "0-dimensional arrays" in out.stderr:
        pytest.skip("this Triton's interpreter does not run with this numpy")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# --- CUDA ----------------------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("out_dtype", [torch.float8_e4m3fn, torch.int8, torch.bfloat16, torch.float32])
def test_cuda_scan_equals_definition_bitwise(out_dtype):
    dev = "cuda"
    T, R, W = 24, 300, 200
    acc = torch.randint(-20, 21, (T, R, 3 * W), generator=gen(14)).float().to(dev)  # integer accumulator
    cur = acc[..., W:2 * W]  # a column slice, as the engine passes it
    scale = torch.full((W,), 0.05, device=dev)
    bias = torch.randn(W, generator=gen(15)).to(dev) * 0.1
    valid = (torch.rand(R, generator=gen(16)) < 0.8).float().to(dev)
    for kw in (dict(), dict(scale=scale, bias=bias)):
        outs = []
        for fn in (kernels.scan_reference, kernels.scan):
            st = kernels.ScanState(R, W, T, dev)
            a = fn(cur, st, t0=0, valid=valid, out_dtype=out_dtype, leak=0.95, **kw)
            outs.append((a.float(), st.mem, st.counts, st.weighted))
        for x, y in zip(*outs):
            assert torch.equal(x, y)
        assert 0.02 < float(outs[0][0].mean()) < 0.98


@cuda
def test_cuda_scan_with_layernorm_and_gelu_is_close():
    dev = "cuda"
    T, R, W = 16, 256, 768
    acc = torch.randint(-30, 31, (T, R, W), generator=gen(17)).float().to(dev)
    res = (torch.rand(T, R, W, generator=gen(18)) < 0.3).to(torch.float8_e4m3fn).to(dev)
    scale = torch.full((W,), 0.04, device=dev)
    bias = torch.randn(W, generator=gen(19)).to(dev) * 0.1
    norm = (torch.rand(W, generator=gen(20)).to(dev) + 0.5, torch.randn(W, generator=gen(21)).to(dev) * 0.1, 1e-12)
    for kw in (dict(residual=res, norm=norm), dict(gelu=True)):
        cur_ref = kernels.scan_reference(acc, None, scale=scale, bias=bias, **kw)
        cur_got = kernels.scan(acc, None, scale=scale, bias=bias, **kw)
        assert torch.allclose(cur_got, cur_ref, rtol=1e-5, atol=1e-5)
        a = kernels.scan_reference(acc, kernels.ScanState(R, W, T, dev), scale=scale, bias=bias, **kw)
        b = kernels.scan(acc, kernels.ScanState(R, W, T, dev), scale=scale, bias=bias, **kw)
        assert float((a != b).float().mean()) < 1e-3


@cuda
@pytest.mark.parametrize("operand", ["fp8", "int8", "bf16"])
@pytest.mark.parametrize("K", [768, 3072, 40])
def test_cuda_spike_products_are_exact(operand, K):
    dev = "cuda"
    values, _ = quantize(torch.randn(256, K, generator=gen(22)), "ternary")
    spikes = (torch.rand(512, K, generator=gen(23)) < 0.5).float()
    spikes[0] = 1.0  # the largest sums
    values[:, :K // 2] = values[:, :K // 2].abs().clamp(min=1)
    want = F.linear(spikes.double(), values.double())
    dt = kernels.operand_dtype(operand)
    got = kernels.spike_matmul(spikes.to(dev).to(dt), values.to(dev).to(dt), operand)
    assert torch.equal(got.double().cpu(), want)
