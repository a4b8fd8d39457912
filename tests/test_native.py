"""The compiled CPU scan: equal to PyTorch's scan bit for bit, its statistics, its layouts, its
fallback, and the multi-step engine with and without it."""

import pytest
import torch

from spikingbert_sim import engine, kernels, native
from spikingbert_sim.engine import EngineOptions, simulate_multistep
from spikingbert_sim.errors import ConfigError
from spikingbert_sim.quantization import QuantLinear
from spikingbert_sim.simulation import RecordOptions, simulate
from test_engine import assert_same

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the compiled scan is off")
T = 13


def currents(t, r, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, r, w, generator=g, dtype=torch.float64) * 0.8 + 0.35).to(dtype)


def reference_stats(spikes, valid, leak, weighted0):
    """What the recorder computes from the spikes: valid spikes per step, Σ γ^{t-τ} s[τ]."""
    counts = (spikes * valid.view(1, -1, 1).to(spikes.dtype)).sum((1, 2)).to(torch.int64)
    w = weighted0.clone()
    for s in spikes:
        w = w * leak + s if leak != 1.0 else w + s
    return counts, w


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold, leak", [(1.0, 1.0), (0.7, 0.9), (0.3, 0.95)])
@pytest.mark.parametrize("threads", [1, 2])
def test_scan_equals_torch_scan_bitwise(dtype, threshold, leak, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        R, W = 300, 70  # W not a multiple of the vector width; R split unevenly over threads
        cur = currents(T, R, W, dtype)
        mem0 = (torch.randn(R, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.2).to(dtype)
        ref_spikes, ref_mem = kernels.scan_torch(cur, threshold, leak, mem0)
        valid = torch.rand(R, generator=torch.Generator().manual_seed(2)) < 0.7
        w0 = torch.rand(R, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
        ref_counts, ref_w = reference_stats(ref_spikes, valid, leak, w0)

        mem, w = mem0.clone(), w0.clone()
        counts = torch.full((T,), 5, dtype=torch.int64)  # counts are added to what is there
        low = torch.empty(T, R, W, dtype=torch.bfloat16)
        spikes = native.scan(cur, mem, threshold=threshold, leak=leak, out_bf16=low, weighted=w,
                             counts=counts, valid=valid)
        assert torch.equal(spikes, ref_spikes)
        assert torch.equal(mem, ref_mem)
        assert torch.equal(low.to(dtype), ref_spikes)
        assert torch.equal(w, ref_w)
        assert torch.equal(counts, ref_counts + 5)
        assert 0.05 < float(ref_spikes.mean()) < 0.95  # neither silent nor saturated
    finally:
        torch.set_num_threads(before)


@needs_native
def test_scan_reads_and_writes_column_slices_and_constant_currents():
    R, W = 40, 24
    wide = currents(T, R, 3 * W, torch.float32, seed=4)
    out = torch.full((T, R, 2 * W), 7.0)
    mem = torch.zeros(R, W)
    native.scan(wide[..., W:2 * W], mem, out=out[..., :W])  # rows of stride 3W in, 2W out
    ref, _ = kernels.scan_torch(wide[..., W:2 * W].contiguous(), 1.0, 1.0, None)
    assert torch.equal(out[..., :W], ref)
    assert torch.equal(out[..., W:], torch.full((T, R, W), 7.0))  # the other columns untouched

    const = currents(1, R, W, torch.float64, seed=5)[0]
    expanded = const.expand(T, R, W)  # stride 0 over time, as the input layer's current
    assert expanded.stride(0) == 0
    ref, ref_mem = kernels.scan_torch(expanded, 1.0, 1.0, None)
    mem = torch.zeros(R, W, dtype=torch.float64)
    assert torch.equal(native.scan(expanded, mem), ref)
    assert torch.equal(mem, ref_mem)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R, W, leak", [(37, 70, 1.0), (5, native.BLOCK + 300, 0.9)])
@pytest.mark.parametrize("low", [True, False])
def test_scan_of_an_accumulator_equals_mul_add_then_scan(dtype, R, W, leak, low):
    """K and V: the neuron takes ``(acc·scale) + bias`` on the fly, as torch's mul then add_; the
    accumulator bf16, or in the model's dtype (a product over K > 256, summed in slices)."""
    g = torch.Generator().manual_seed(8)
    span = 60 if low else 3000
    wide = torch.randint(-span, span + 1, (T, R, W + 9), generator=g).to(torch.bfloat16 if low else dtype)
    acc = wide[..., 4:4 + W]  # a column slice: rows of stride W + 9
    scale = (torch.rand(W, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    bias = (torch.randn(W, generator=g, dtype=torch.float64) * 0.3 + 0.2).to(dtype)
    ref_spikes, ref_mem = kernels.scan_torch(torch.mul(acc, scale).add_(bias), 0.7, leak, None)
    mem = torch.zeros(R, W, dtype=dtype)
    w = torch.zeros(R, W, dtype=dtype)
    counts = torch.zeros(T, dtype=torch.int64)
    spikes = native.scan(acc, mem, threshold=0.7, leak=leak, scale=scale, bias=bias, weighted=w, counts=counts)
    assert spikes.dtype == dtype
    assert torch.equal(spikes, ref_spikes) and torch.equal(mem, ref_mem)
    assert torch.equal(counts, ref_spikes.sum((1, 2)).to(torch.int64))
    assert 0.05 < float(ref_spikes.mean()) < 0.95
    no_bias, _ = kernels.scan_torch(torch.mul(acc, scale), 0.7, leak, None)
    assert torch.equal(native.scan(acc, torch.zeros(R, W, dtype=dtype), threshold=0.7, leak=leak, scale=scale), no_bias)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_equals_mul_add_add_bitwise(dtype):
    g = torch.Generator().manual_seed(9)
    acc = torch.randint(-200, 201, (3, 5, 7, 3 * 40), generator=g).to(torch.bfloat16)
    scale = torch.rand(3 * 40, generator=g, dtype=torch.float64).to(dtype) / 7  # not dyadic: rounds
    bias = torch.randn(3 * 40, generator=g, dtype=torch.float64).to(dtype)
    spikes = (torch.rand(3, 5, 7, 40, generator=g) < 0.3).to(torch.bfloat16)
    full = native.affine(acc, scale, bias)
    assert full.dtype == dtype and full.is_contiguous()
    assert torch.equal(full, torch.mul(acc, scale).add_(bias))
    wide = torch.randint(-3000, 3001, acc.shape, generator=g).to(dtype)  # a float accumulator
    assert torch.equal(native.affine(wide, scale, bias, spikes[..., :1].expand(3, 5, 7, 120).contiguous()),
                       torch.mul(wide, scale).add_(bias).add_(spikes[..., :1]))
    cols = slice(40, 80)  # one module's columns of a stacked product, plus a residual
    got = native.affine(acc[..., cols], scale[cols], bias[cols], spikes)
    ref = torch.mul(acc[..., cols], scale[cols]).add_(bias[cols]).add_(spikes)
    assert torch.equal(got, ref)
    # the residual in the scale's dtype (where the engine's products run in float, not bf16)
    assert torch.equal(native.affine(acc[..., cols].to(dtype), scale[cols], bias[cols], spikes.to(dtype)), ref)
    # the order of the roundings matters: (a·s + r) + b differs from ((a·s) + b) + r somewhere
    assert not torch.equal(got, torch.mul(acc[..., cols], scale[cols]).add_(spikes).add_(bias[cols]))
    out = torch.full((3, 5, 7, 40), 9.0, dtype=dtype)
    assert native.affine(acc[..., cols], scale[cols], out=out) is out
    assert torch.equal(out, torch.mul(acc[..., cols], scale[cols]))


@needs_native
@pytest.mark.parametrize("bad, match", [
    (dict(acc=torch.zeros(4, 6, dtype=torch.float64)), "acc must be"),  # neither bf16 nor the scale's dtype
    (dict(scale=torch.ones(6, dtype=torch.float16)), "float32 or float64"),
    (dict(scale=torch.ones(5)), "scale must be"),
    (dict(bias=torch.ones(6, dtype=torch.float64)), "bias must be"),
    (dict(residual=torch.zeros(4, 6, dtype=torch.float64)), "residual must be"),  # not the scale's dtype
    (dict(residual=torch.zeros(4, 5)), "residual must be"),
    (dict(out=torch.zeros(6, 4).t()), "out must be"),
    (dict(acc=torch.zeros(2, 4, 6, dtype=torch.bfloat16).transpose(0, 1)), "merge into one stride"),
])
def test_affine_rejects_bad_arguments(bad, match):
    args = dict(acc=torch.zeros(4, 6, dtype=torch.bfloat16), scale=torch.ones(6))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        native.affine(args.pop("acc"), args.pop("scale"), **args)


def heads(x, B, L, H, dh, transposed=False):
    """(t, R, W) -> the per-head layout (t, B, H, L, dh), or (t, B, H, dh, L) transposed."""
    y = x.reshape(x.shape[0], B, L, H, dh).permute(0, 1, 3, 2, 4)
    return (y.transpose(-1, -2) if transposed else y).contiguous()


@needs_native
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, L, H, dh", [
    (3, 5, 4, 6),  # W = 24: groups of rows cross sequence boundaries
    (2, 32, 4, 16),  # W = 64: groups of 16 rows inside a sequence (Kᵀ written a column at a time)
    (2, 3, 2, 600),  # W = 1,200: blocks of columns, heads cut across blocks
])
def test_scan_reads_and_writes_per_head_layouts(transposed, dtype, B, L, H, dh):
    R, W = B * L, H * dh
    cur = currents(T, R, W, dtype, seed=10)
    ref, ref_mem = kernels.scan_torch(cur, 0.8, 0.9, None)
    layout = native.head_layout(B, L, H, dh, transposed)
    # spikes written per head (float and bf16), membranes and counts as usual
    out = torch.full(heads(cur, B, L, H, dh, transposed).shape, 7.0, dtype=dtype)
    low = torch.zeros(out.shape, dtype=torch.bfloat16)
    mem, counts = torch.zeros(R, W, dtype=dtype), torch.zeros(T, dtype=torch.int64)
    got = native.scan(cur, mem, threshold=0.8, leak=0.9, out=out, out_bf16=low, out_layout=layout, counts=counts)
    assert got is out
    assert torch.equal(out, heads(ref, B, L, H, dh, transposed))
    assert torch.equal(low.to(dtype), out) and torch.equal(mem, ref_mem)
    assert torch.equal(counts, ref.sum((1, 2)).to(torch.int64))
    # currents read per head (attention's context), spikes row-major
    if not transposed:
        mem = torch.zeros(R, W, dtype=dtype)
        got = native.scan(heads(cur, B, L, H, dh), mem, threshold=0.8, leak=0.9, in_layout=layout)
        assert torch.equal(got, ref) and torch.equal(mem, ref_mem)
    with pytest.raises(ValueError, match="matching its layout"):
        native.scan(cur, torch.zeros(R, W, dtype=dtype), out=out[:, :1], out_layout=layout)
    with pytest.raises(ValueError, match="needs out"):
        native.scan(cur, torch.zeros(R, W, dtype=dtype), out_layout=layout)
    with pytest.raises(ValueError, match="needs out"):  # float spikes asked for, only bf16 given
        native.scan(cur, torch.zeros(R, W, dtype=dtype), out_bf16=low, out_layout=layout)
    low.zero_()
    assert native.scan(cur, torch.zeros(R, W, dtype=dtype), threshold=0.8, leak=0.9, out_bf16=low,
                       float_out=False, out_layout=layout) is low
    assert torch.equal(low.to(dtype), out)
    # a layout that addresses elements outside the tensor is refused, not written
    for bad in (layout._replace(bs=layout.bs + 1), layout._replace(cols=layout.cols + 1),
                layout._replace(cols=layout.cols - 1)):
        with pytest.raises(ValueError, match="outside"):
            native.scan(cur, torch.zeros(R, W, dtype=dtype), out=out, out_layout=bad)


@needs_native
@pytest.mark.parametrize("t, B, L, H, dh", [(4, 2, 7, 3, 8), (2, 2, 3, 2, 600)])
def test_affine_writes_a_per_head_layout(t, B, L, H, dh):
    W = H * dh
    g = torch.Generator().manual_seed(11)
    acc = torch.randint(-90, 91, (t, B, L, 2 * W), generator=g).to(torch.bfloat16)[..., W:]
    scale, bias = torch.rand(W, generator=g) / 3, torch.randn(W, generator=g)
    out = torch.empty(t, B, H, L, dh)
    got = native.affine(acc, scale, bias, out=out, out_layout=native.head_layout(B, L, H, dh))
    assert got is out
    ref = torch.mul(acc, scale).add_(bias)
    assert torch.equal(out, heads(ref.reshape(t, B * L, W), B, L, H, dh))
    with pytest.raises(ValueError, match="needs out"):
        native.affine(acc, scale, bias, out_layout=native.head_layout(B, L, H, dh))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, W, density", [
    (64, 64, 0.3),  # groups of 16 rows, 4 AVX2 registers
    (70, 40, 0.5),  # 2 registers and 8 columns past them
    (256, 200, 0.1),  # 8 + 4 registers and 8 columns past them; 4 words of inputs
    (3, 1200, 0.9),  # a row cut into blocks of columns
    (130, 17, 1.0),  # every input firing: the sums reach ±K
])
def test_scan_sums_a_binary_ternary_product_as_accumulate_then_scan(dtype, K, W, density):
    """The neuron summing its layer's currents from the input spikes equals the product written
    out (native.accumulate, itself equal to the dense product) and then scanned: spikes,
    membranes, statistics, bit for bit; with a table, a function of the currents likewise."""
    g = torch.Generator().manual_seed(K * W)
    R = 37
    x = (torch.rand(T, R, K, generator=g) < density).to(dtype)
    wt = torch.randint(-1, 2, (K, W), generator=g).to(torch.int8)
    if density == 1.0:
        wt[:, 0] = 1  # column 0 sums to K at every step
    scale = (torch.rand(W, generator=g, dtype=torch.float64) / 5).to(dtype)
    bias = (torch.randn(W, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    cur = torch.mul(x @ wt.to(dtype), scale).add_(bias)
    valid = torch.rand(R, generator=g) < 0.8
    mem0 = torch.randn(R, W, generator=g, dtype=torch.float64).to(dtype) * 0.3

    def run(current, **kw):
        mem, w = mem0.clone(), torch.zeros(R, W, dtype=dtype)
        counts = torch.zeros(T, dtype=torch.int64)
        out = native.scan(current, mem, threshold=0.8, leak=0.9, weighted=w, counts=counts, valid=valid, **kw)
        return out, mem, w, counts

    for got, want in zip(run(x, weight_t=wt, scale=scale, bias=bias), run(cur)):
        assert torch.equal(got, want)
    assert torch.equal(run(x, weight_t=wt.to(torch.int16), scale=scale)[0],
                       run(torch.mul(x @ wt.to(dtype), scale))[0])  # no bias
    table = native.product_table(torch.nn.functional.gelu, scale, bias, K)
    assert table.shape == (2 * K + 1, W) and table.dtype == dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # PyTorch's vectorized GELU (its scalar loop for a tail rounds otherwise): whole vectors only
        gelu = torch.nn.functional.gelu(cur.reshape(-1)[:cur.numel() // 64 * 64])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(table[(x @ wt.to(dtype)).reshape(-1)[:gelu.numel()].long() + K,
                             torch.arange(gelu.numel()) % W], gelu)
    for got, want in zip(run(x, weight_t=wt, table=table), run(table[(x @ wt.to(dtype)).long() + K, torch.arange(W)])):
        assert torch.equal(got, want)


def unpack(bits, width, dtype):
    """(..., words) int64 -> (..., width) 0/1 spikes: bit j % 64 of word j // 64 is column j."""
    return ((bits.unsqueeze(-1) >> torch.arange(64)) & 1).flatten(-2)[..., :width].to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, W", [(64, 64), (70, 40), (256, 200), (3, 1200), (130, 17)])
def test_spikes_as_bits_feed_the_accumulation_and_the_summed_scan(dtype, K, W):
    """scan's out_bits hold its spikes 64 to a word; accumulate and a summed scan read them as
    they read the float spikes, bit for bit."""
    g = torch.Generator().manual_seed(K + W)
    R = 37
    cur = currents(T, R, K, dtype, seed=K)
    bits = torch.full((T, R, native.words(K)), -1, dtype=torch.int64)
    spikes = native.scan(cur, torch.zeros(R, K, dtype=dtype), leak=0.9, out_bits=bits)
    assert torch.equal(unpack(bits, K, dtype), spikes)
    if K % 64:  # the bits past the last column are zero
        assert torch.equal(bits[..., -1] >> (K % 64), torch.zeros(T, R, dtype=torch.int64))
    only = torch.zeros_like(bits)  # bits alone: no float spikes written
    assert native.scan(cur, torch.zeros(R, K, dtype=dtype), leak=0.9, out_bits=only, float_out=False) is only
    assert torch.equal(only, bits)
    wt = torch.randint(-1, 2, (K, W), generator=g).to(torch.int16)
    scale = (torch.rand(W, generator=g, dtype=torch.float64) / 5).to(dtype)
    bias = torch.randn(W, generator=g, dtype=torch.float64).to(dtype)
    assert torch.equal(native.accumulate(bits, wt, scale=scale, bias=bias),
                       native.accumulate(spikes, wt, scale=scale, bias=bias))
    assert torch.equal(native.accumulate(bits, wt, out=torch.empty(T, R, W, dtype=dtype)), spikes @ wt.to(dtype))
    assert torch.equal(native.scan(bits, torch.zeros(R, W, dtype=dtype), weight_t=wt, scale=scale, bias=bias),
                       native.scan(spikes, torch.zeros(R, W, dtype=dtype), weight_t=wt, scale=scale, bias=bias))
    if K % 64:  # bits set past the last input are ignored (no weight row read beyond K)
        dirty = bits.clone()
        dirty[..., -1] |= -1 << (K % 64)
        assert torch.equal(native.accumulate(dirty, wt, out=torch.empty(T, R, W, dtype=dtype)), spikes @ wt.to(dtype))
        assert torch.equal(native.scan(dirty, torch.zeros(R, W, dtype=dtype), weight_t=wt, scale=scale),
                           native.scan(spikes, torch.zeros(R, W, dtype=dtype), weight_t=wt, scale=scale))
    with pytest.raises(ValueError, match="as bits take"):
        native.accumulate(bits[..., :-1] if bits.shape[-1] > 1 else torch.zeros(T, R, 2, dtype=torch.int64), wt)
    with pytest.raises(ValueError, match="as bits take"):
        native.scan(torch.zeros(T, R, native.words(K) + 1, dtype=torch.int64), torch.zeros(R, W, dtype=dtype),
                    weight_t=wt, scale=scale)
    with pytest.raises(ValueError, match="out_bits must be"):
        native.scan(cur, torch.zeros(R, K, dtype=dtype), out_bits=torch.zeros(T, R, native.words(K) + 1, dtype=torch.int64))


@needs_native
def test_scan_summing_a_product_writes_a_per_head_layout():
    B, L, H, dh, K = 2, 32, 4, 16, 64
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(T, B * L, K, generator=g) < 0.3).float()
    wt = torch.randint(-1, 2, (K, H * dh), generator=g).to(torch.int16)
    scale, bias = torch.rand(H * dh, generator=g) / 4, torch.randn(H * dh, generator=g) / 3
    ref = native.scan(torch.mul(x @ wt.float(), scale).add_(bias), torch.zeros(B * L, H * dh))
    out = torch.empty(T, B, H, dh, L)
    native.scan(x, torch.zeros(B * L, H * dh), weight_t=wt, scale=scale, bias=bias, out=out,
                out_layout=native.head_layout(B, L, H, dh, transposed=True))
    assert torch.equal(out, heads(ref, B, L, H, dh, transposed=True))


@needs_native
@pytest.mark.parametrize("kw, match", [
    (dict(weight_t=torch.zeros(6, 4)), "contiguous int8 or int16"),
    (dict(weight_t=torch.zeros(5, 4, dtype=torch.int8)), "contiguous int8 or int16"),
    (dict(weight_t=torch.zeros(4, 6, dtype=torch.int8).t()), "contiguous int8 or int16"),
    (dict(weight_t=torch.zeros(6, 4, dtype=torch.int8)), "needs a scale or a table"),
    (dict(weight_t=torch.zeros(6, 4, dtype=torch.int8), table=torch.zeros(12, 4)), "table must be"),
    (dict(weight_t=torch.zeros(6, 4, dtype=torch.int8), table=torch.zeros(13, 4, dtype=torch.float64)), "table must be"),
    (dict(table=torch.zeros(13, 4)), "a table goes with weight_t"),
    (dict(weight_t=torch.zeros(6, 4, dtype=torch.int8), scale=torch.ones(3)), "scale must be"),
    (dict(weight_t=torch.zeros(6, 4, dtype=torch.int8), scale=torch.ones(4), current=torch.zeros(2, 3, 6).double()),
     "input spikes"),
    (dict(weight_t=torch.zeros(6, 4, dtype=torch.int8), scale=torch.ones(4), current=torch.zeros(2, 5, 6)),
     "input spikes"),
    (dict(weight_t=torch.zeros(6, 4, dtype=torch.int8), scale=torch.ones(4),
          in_layout=native.head_layout(1, 3, 2, 2)), "row-major only"),
])
def test_scan_summing_a_product_rejects_bad_arguments(kw, match):
    current = kw.pop("current", torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match=match):
        native.scan(current, torch.zeros(3, 4), **kw)


@needs_native
def test_scan_refuses_a_bf16_accumulator_without_its_scale():
    with pytest.raises(ValueError, match="scale"):
        native.scan(torch.zeros(2, 3, 4), torch.zeros(3, 4), bias=torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        native.scan(torch.zeros(2, 3, 4, dtype=torch.bfloat16), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="scale must be"):
        native.scan(torch.zeros(2, 3, 4, dtype=torch.bfloat16), torch.zeros(3, 4), scale=torch.ones(3))


@needs_native
def test_scan_carries_the_membrane_across_calls():
    cur = currents(T, 16, 8, torch.float64, seed=6)
    whole, _ = kernels.scan_torch(cur, 1.0, 0.9, None)
    mem = torch.zeros(16, 8, dtype=torch.float64)
    parts = [native.scan(cur[a:b], mem, leak=0.9) for a, b in ((0, 5), (5, 6), (6, T))]
    assert torch.equal(torch.cat(parts), whole)


@needs_native
@pytest.mark.parametrize("bad, match", [
    (dict(current=torch.zeros(2, 3, 4, dtype=torch.float16)), "float32 or float64"),
    (dict(mem=torch.zeros(3, 5)), "mem must be"),
    (dict(mem=torch.zeros(4, 3).t()), "mem must be"),
    (dict(weighted=torch.zeros(3, 4, dtype=torch.float64)), "weighted must be"),
    (dict(counts=torch.zeros(2, dtype=torch.int32)), "counts must be"),
    (dict(out=torch.zeros(2, 4, 3).transpose(1, 2)), "out must be"),
    (dict(out_bf16=torch.zeros(2, 3, 4)), "out_bf16 must be"),
    (dict(counts=torch.zeros(4, dtype=torch.int64)[::2]), "counts must be"),
    (dict(out=torch.zeros(2, 1, 4).expand(2, 3, 4)), "rows must not overlap"),
])
def test_scan_rejects_bad_arguments(bad, match):
    args = dict(current=torch.zeros(2, 3, 4), mem=torch.zeros(3, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        native.scan(args.pop("current"), args.pop("mem"), **args)


def test_switched_off_or_without_a_compiler_it_is_unavailable(monkeypatch, tmp_path):
    try:
        native._library.cache_clear()
        monkeypatch.setenv("SPIKINGBERT_NATIVE", "0")
        assert not native.available()
        with pytest.raises(RuntimeError, match="unavailable"):
            native.scan(torch.zeros(1, 1, 1), torch.zeros(1, 1))

        native._library.cache_clear()
        monkeypatch.setenv("SPIKINGBERT_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("SPIKINGBERT_CACHE", str(tmp_path / "cache"))
        with pytest.warns(RuntimeWarning, match="compiled CPU scan is unavailable"):
            assert not native.available()
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


@needs_native
def test_build_is_cached_and_written_once(monkeypatch, tmp_path):
    try:
        monkeypatch.setenv("SPIKINGBERT_CACHE", str(tmp_path))
        native._library.cache_clear()
        assert native.available()
        built = sorted(p.name for p in tmp_path.iterdir())
        assert len(built) == 1 and built[0].startswith("scan-") and built[0].endswith(".so")
        stamp = (tmp_path / built[0]).stat().st_mtime_ns
        native._library.cache_clear()
        assert native.available()  # loads the cached library, no second build
        assert sorted(p.name for p in tmp_path.iterdir()) == built
        assert (tmp_path / built[0]).stat().st_mtime_ns == stamp
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


# --- the engine with and without the compiled scan --------------------------------------------

@needs_native
@pytest.mark.parametrize("mode, overrides, padded, dtype", [
    ("fp", {}, True, torch.float64), ("ternary", {}, True, torch.float64),
    ("binary", dict(leak=0.9, threshold=0.7), True, torch.float64), ("ternary", {}, False, torch.float64),
    ("ternary", {}, True, torch.float32), ("binary", {}, False, torch.float32),
    ("ternary", dict(initial_membrane=0.5), True, torch.float64)])
@pytest.mark.parametrize("product", ["float", "bf16", "accumulate"])  # the CPU's exact products
def test_engine_with_and_without_the_compiled_scan_equals_the_reference(make_model, batch, monkeypatch,
                                                                        mode, overrides, padded, dtype, product):
    monkeypatch.setenv("SPIKINGBERT_CPU_PRODUCT", product)
    model = make_model(mode, **overrides).to(dtype)
    ids, mask = batch
    if not padded:
        mask = torch.ones_like(mask)
    rec = RecordOptions(per_neuron=True, sites=("layer.1.intermediate", "layer.0.key"), logits_trace=True,
                        raster_sites=("layer.0.value", "layer.1.output"), raster_sequences=(0, 2),
                        raster_tokens=(1, 3), raster_neurons=5)
    opts = EngineOptions(backend="torch", chunk_steps=5)
    scan, summed, packed = native.scan, [], []

    def spy(*a, **kw):
        summed.append(kw.get("weight_t") is not None)
        packed.append(kw.get("out_bits") is not None)
        return scan(*a, **kw)

    monkeypatch.setattr(native, "scan", spy)
    compiled = simulate_multistep(model, ids, mask, timesteps=T, record=rec, options=opts)
    # with the compiled accumulation, K, V and the intermediate neurons sum their own currents
    assert sum(summed) == (3 * len(model.layers) * -(-T // 5) if product == "accumulate" and mode != "fp" else 0)
    # and every site whose spikes feed a binary/ternary product writes them as bits too (the input,
    # attention, attention-output, intermediate and output neurons; floats where recorded or summed)
    assert sum(packed) == ((1 + 4 * len(model.layers)) * -(-T // 5) if product == "accumulate" and mode != "fp" else 0)
    monkeypatch.setattr(engine.native, "available", lambda: False)
    plain = simulate_multistep(model, ids, mask, timesteps=T, record=rec, options=opts)
    ref = simulate(model, ids, mask, timesteps=T, engine="reference", record=rec)
    for result in (compiled, plain):
        assert_same(result, ref)
        for site in ref.rasters:
            assert torch.equal(result.rasters[site], ref.rasters[site]), site
        for site in ref.neuron_asr_trace:
            assert torch.equal(result.neuron_asr_trace[site], ref.neuron_asr_trace[site]), site
    assert compiled.rasters and compiled.neuron_asr_trace
    assert torch.equal(compiled.logits_trace, ref.logits_trace)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_engine_with_products_over_more_than_256_inputs_equals_the_reference(make_model, batch, dtype, monkeypatch):
    """hidden 272, intermediate 300: every product sums bf16 slices into a float accumulator, which
    the compiled kernels then scale (not the bf16 path)."""
    monkeypatch.setenv("SPIKINGBERT_CPU_PRODUCT", "bf16")
    model = make_model("ternary", hidden_size=272, num_attention_heads=4, intermediate_size=300).to(dtype)
    ids, mask = batch
    assert model.config.hidden_size > kernels.EXACT_BF16_K
    fast = simulate_multistep(model, ids, mask, timesteps=6, options=EngineOptions(backend="torch"))
    assert_same(fast, simulate(model, ids, mask, timesteps=6, engine="reference"))
    r = engine.spike_mismatch(model, ids, mask, 6, EngineOptions(backend="torch"))
    assert r["mismatch"] == 0 and r["slots"] > 0


def test_cpu_spike_product_switch(monkeypatch):
    for choice in ("float", "bf16", "accumulate"):
        monkeypatch.setenv("SPIKINGBERT_CPU_PRODUCT", choice)
        assert kernels.cpu_spike_product() == choice
    monkeypatch.setenv("SPIKINGBERT_CPU_PRODUCT", "int4")
    with pytest.raises(ConfigError, match="SPIKINGBERT_CPU_PRODUCT must be one of auto, bf16, accumulate, float"):
        kernels.cpu_spike_product()
    monkeypatch.setenv("SPIKINGBERT_CPU_PRODUCT", "auto")
    assert kernels.cpu_spike_product() == ("bf16" if kernels._bf16_probe() else "accumulate")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    kernels._bf16_probe.cache_clear()
    try:  # without oneDNN's bf16 support: the compiled accumulation, whatever a probe would say
        assert kernels.cpu_spike_product() == "accumulate"
        monkeypatch.setattr(engine.native, "available", lambda: False)
        assert kernels.cpu_spike_product() == "float"
    finally:
        kernels._bf16_probe.cache_clear()


@pytest.mark.parametrize("choice, dtype, accumulates", [
    ("float", torch.float32, False), ("bf16", torch.bfloat16, False), ("accumulate", torch.float32, True)])
def test_engine_products_follow_the_switch_with_the_same_result(monkeypatch, choice, dtype, accumulates):
    layer = QuantLinear(40, 24, mode="ternary")
    x = (torch.rand(5, 40, generator=torch.Generator().manual_seed(3)) < 0.4).float()
    monkeypatch.setenv("SPIKINGBERT_CPU_PRODUCT", choice)
    lin = engine._ExactLinear([layer], torch.float32, torch.device("cpu"))
    assert lin.values.dtype == dtype and (lin.wt is not None) == accumulates
    assert lin.product(x).dtype == dtype
    with torch.no_grad():  # QuantLinear's inference form: (x @ valuesᵀ)·scale + bias
        assert torch.equal(lin(x)[0], layer(x))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, N, density", [(64, 192, 0.25), (300, 7, 0.5), (5, 1100, 0.9), (1, 3, 1.0), (700, 64, 0.0)])
def test_accumulate_equals_the_dense_product_bitwise(dtype, K, N, density):
    g = torch.Generator().manual_seed(K + N)
    x = (torch.rand(3, 37, K, generator=g) < density).to(dtype)
    w = torch.randint(-1, 2, (K, N), generator=g).to(torch.int8)
    got = native.accumulate(x, w)
    assert got.dtype == dtype and got.shape == (3, 37, N)
    assert torch.equal(got, x @ w.to(dtype))
    ones = torch.ones(2, K, dtype=dtype)  # every input firing into all +1 weights: the sum K exactly
    assert torch.equal(native.accumulate(ones, torch.ones(K, N, dtype=torch.int8)), torch.full((2, N), float(K), dtype=dtype))
    out = torch.full((3, 37, N), 7.0, dtype=dtype)
    assert native.accumulate(x[:, :, :], w, out=out) is out and torch.equal(out, got)
    assert torch.equal(native.accumulate(x.transpose(0, 1), w), got.transpose(0, 1))  # rows in any order
    # the fused epilogue: the affine pass's roundings, (product·scale + bias) + residual
    scale = (torch.rand(N, generator=g, dtype=torch.float64) / 7).to(dtype)  # not dyadic: rounds
    bias = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
    res = (torch.rand(3, 37, N, generator=g) < 0.3).to(dtype)
    assert torch.equal(native.accumulate(x, w, scale=scale, bias=bias, residual=res),
                       torch.mul(got, scale).add_(bias).add_(res))
    assert torch.equal(native.accumulate(x, w, scale=scale, bias=bias), native.affine(got, scale, bias))
    assert torch.equal(native.accumulate(x, w, scale=scale), torch.mul(got, scale))


@needs_native
@pytest.mark.parametrize("args, match", [
    ((torch.zeros(4, 6, dtype=torch.bfloat16), torch.zeros(6, 3, dtype=torch.int8)), "float32 or float64"),
    ((torch.zeros(4, 6), torch.zeros(6, 3)), "contiguous int8"),
    ((torch.zeros(4, 6), torch.zeros(5, 3, dtype=torch.int8)), "contiguous int8"),
    ((torch.zeros(4, 6), torch.zeros(3, 6, dtype=torch.int8).t()), "contiguous int8"),
    ((torch.zeros(2, 40000), torch.zeros(40000, 1, dtype=torch.int8)), "1 to 32767 inputs"),
    ((torch.zeros(2, 0), torch.zeros(0, 1, dtype=torch.int8)), "1 to 32767 inputs"),
])
def test_accumulate_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        native.accumulate(*args)
    x, w = torch.zeros(4, 6), torch.zeros(6, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="out must be"):
        native.accumulate(x, w, out=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="goes with a scale"):
        native.accumulate(x, w, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="scale must be"):
        native.accumulate(x, w, scale=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual must be"):
        native.accumulate(x, w, scale=torch.ones(3), residual=torch.zeros(4, 2))


def test_tune_malloc_is_switchable(monkeypatch):
    monkeypatch.setenv("SPIKINGBERT_MALLOC", "0")
    assert native.tune_malloc.__wrapped__() is False
    monkeypatch.delenv("SPIKINGBERT_MALLOC")
    import platform
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert native.tune_malloc.__wrapped__() is True  # glibc accepts both settings
