r"""Kernels of the multi-step engine: a fused neuron scan and exact low-precision spike products.

Each kernel exists twice, in SpikingJelly's manner: a pure-PyTorch function that *defines* what it
computes (runs anywhere; used on the CPU, in tests, and as the fallback), and a Triton kernel that
computes the same on CUDA. Triton is imported lazily, so CPU-only installs never need it.

Shapes are time-first and flattened over tokens: ``(t, R, W)`` with R = B·L rows (tokens) and W
neurons per token.

**Fused scan** (:func:`scan`). One pass over a layer's input for t steps, per neuron:

.. math::

    x = \mathrm{post}(c[t]), \quad u \leftarrow \gamma u + x, \quad s[t] = H(u - V_{th}),
    \quad u \leftarrow u - V_{th}\, s[t], \quad w \leftarrow \gamma w + s[t]

where ``post`` is the epilogue of the layer that produced the current ``c``: ``c·scale + bias``
(a spike product's integer accumulator and its per-matrix scale), then GELU, or ``+ residual``
then LayerNorm. The membrane ``u`` and the ASR numerator ``w`` (SPEC Eqn 2) stay in registers for
all t steps; the number of spikes of valid tokens at each step is accumulated on the fly, so
recording costs no second pass over the spikes.

**Spike products** (:func:`spike_matmul`). Spikes are 0/1 and binary/ternary weights ±1/0: all
exact in fp8 e4m3, int8 and bf16, and their sums (|Σ| ≤ K) are exact in an fp32 or int32
accumulator. So ``spikes @ valuesᵀ`` on tensor cores is the exact integer matrix that a float64
CPU product gives, and applying the per-matrix scale and the bias afterwards, in fp32 and in the
same order as :class:`~spikingbert_sim.quantization.QuantLinear`, gives the reference's current bit
for bit. An fp16 output is also exact while K ≤ 2048 (every integer up to 2048 is an fp16 value).
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .errors import ConfigError

OPERANDS = ("fp8", "int8", "bf16", "fp32")
"""Operand formats of spike products on CUDA. ``fp8`` (e4m3, ``torch._scaled_mm``) and ``int8``
(``torch._int_mm``, int32 accumulation) are exact for binary/ternary weights; ``bf16`` is exact for
them too but rounds full-precision weights; ``fp32`` keeps full-precision weights."""

SCAN_COUNTS = "partial"
"""How the Triton scan totals each step's spikes: ``partial`` (per-row sums to a scratch buffer,
summed after the kernel) or ``atomic`` (one atomic add per program and step, which needs a
reduction across the program's warps inside the time loop)."""

EXACT_BF16_K = 256
"""Longest reduction whose integer sum a bf16 *output* holds exactly (every integer ≤ 256)."""


CPU_PRODUCTS = ("auto", "bf16", "accumulate", "float")
"""Ways the CPU engine computes a binary/ternary layer's exact spike product (all give the same
integers, so the choice changes the speed only, never a spike): ``bf16`` products
(:func:`exact_product_cpu`), ``accumulate`` (:func:`native.accumulate`: each row adds the integer
weight rows of its firing inputs, as a neuromorphic chip's synaptic operations), or ``float``
products in the model's dtype."""


def cpu_spike_product() -> str:
    """The CPU engine's exact spike product for binary/ternary weights (one of :data:`CPU_PRODUCTS`
    but ``auto``), from ``SPIKINGBERT_CPU_PRODUCT`` (default ``auto``).

    ``auto``: ``bf16`` where the CPU has bf16 instructions (AVX512-BF16, AMX), on which a bf16
    product runs at about three times an fp32 one: where oneDNN reports bf16 support and a short
    probe (a 512 × 256 × 256 product each way, best of three, once per process) finds it faster.
    Elsewhere oneDNN falls back to a reference loop about a hundred times *slower* than fp32
    (measured: 0.3-1.3 against ~130 GFLOP/s on a 2-core AVX2 AMD EPYC), so ``accumulate`` where
    the compiled kernels are available, else ``float``. The engine falls back to ``float`` for a
    layer that ``accumulate`` cannot take (float16 or bfloat16 models, more than 32,767 inputs).
    """
    choice = os.environ.get("SPIKINGBERT_CPU_PRODUCT", "auto").strip().lower() or "auto"
    if choice not in CPU_PRODUCTS:
        raise ConfigError(f"SPIKINGBERT_CPU_PRODUCT must be one of {', '.join(CPU_PRODUCTS)}, got {choice!r}")
    if choice != "auto":
        return choice
    if _bf16_probe():
        return "bf16"
    return "accumulate" if native.available() else "float"


@functools.lru_cache(maxsize=None)
def _bf16_probe() -> bool:
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        pass  # an older or newer PyTorch without the query: the probe alone decides

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(512, 256, generator=g) < 0.3).float()
    w = torch.randint(-1, 2, (256, 256), generator=g).float()

    def best(a: Tensor, b: Tensor) -> float:
        F.linear(a, b)  # warm-up (oneDNN builds its kernel on the first call)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            F.linear(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(x.bfloat16(), w.bfloat16()) < best(x, w)


# ---------------------------------------------------------------------------------------------
# The fused scan: definition
# ---------------------------------------------------------------------------------------------

def scan_torch(current: Tensor, threshold: float = 1.0, leak: float = 1.0,
               mem: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`~spikingbert_sim.neurons.if_scan` with in-place updates: bitwise the same result.

    ``current`` is (T, ...) and may be an expanded (stride-0) constant. Returns
    ``(spikes (T, ...), final membrane)``; the initial membrane ``mem`` is not modified.

    Each step is three in-place kernels instead of if_step's five allocating ones, with the same
    roundings: γ·u then + I (``mul_`` then ``add_``), and u − V_th·s (V_th·s is exactly 0 or V_th).
    """
    mem = torch.zeros(current.shape[1:], dtype=current.dtype, device=current.device) if mem is None \
        else mem.clone()
    spikes = torch.empty(current.shape, dtype=current.dtype, device=current.device)
    for t in range(current.shape[0]):
        if leak != 1.0:
            mem.mul_(leak)
        mem.add_(current[t])
        torch.gt(mem, threshold, out=spikes[t])
        mem.sub_(spikes[t], alpha=threshold)
    return spikes, mem


class ScanState:
    """State of one spiking site between time chunks of a scan.

    mem: (R, W) membrane (``initial`` everywhere at the start); weighted: (R, W) ASR numerator
    Σ γ^{t-τ} s[τ] (or None: not tracked);
    counts: (T,) spikes of valid tokens per step (or None), int32 (the Triton scan) or int64 (the
    compiled CPU scan).
    """

    def __init__(self, rows: int, width: int, timesteps: int, device, dtype=torch.float32,
                 stats: bool = True, counts_dtype: torch.dtype = torch.int32, initial: float = 0.0) -> None:
        self.mem = torch.full((rows, width), initial, device=device, dtype=dtype)  # U[0]
        self.weighted = torch.zeros(rows, width, device=device, dtype=dtype) if stats else None
        self.counts = torch.zeros(timesteps, device=device, dtype=counts_dtype) if stats else None


def epilogue_torch(current: Tensor, *, scale: Tensor | None = None, bias: Tensor | None = None,
                   gelu: bool = False, residual: Tensor | None = None,
                   norm: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    """The current a scan sees: ``c·scale + bias``, GELU (erf), ``+ residual``, LayerNorm, in fp32.

    The same sequence of roundings as the model's modules (QuantLinear multiplies by the scale, then
    adds the bias); the Triton kernel's LayerNorm and GELU may differ from this in the last bit.
    """
    x = current.to(torch.float32)
    if scale is not None:
        x = x * scale
    if bias is not None:
        x = x + bias
    if gelu:
        x = F.gelu(x)
    if residual is not None:
        x = x + residual.to(torch.float32)
    if norm is not None:
        x = F.layer_norm(x, x.shape[-1:], norm[0], norm[1], norm[2])
    return x


def scan_reference(current: Tensor, state: ScanState | None, *, t0: int = 0, timesteps: int | None = None,
                   scale: Tensor | None = None, bias: Tensor | None = None, gelu: bool = False,
                   residual: Tensor | None = None, norm: tuple[Tensor, Tensor, float] | None = None,
                   threshold: float = 1.0, leak: float = 1.0, valid: Tensor | None = None,
                   out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Definition of :func:`scan`. ``current``: (t, R, W), or a constant (R, W) with ``timesteps``.

    With ``state=None`` no neuron runs: the epilogue's current itself is returned (used for the
    real-valued query projection). Otherwise updates ``state`` (membrane, ASR numerator, per-step
    counts of spikes at rows where ``valid`` (R,) is nonzero, at steps t0...) and returns spikes.
    """
    if current.dim() == 2:
        current = current.unsqueeze(0).expand(timesteps, *current.shape)
    x = epilogue_torch(current, scale=scale, bias=bias, gelu=gelu, residual=residual, norm=norm)
    if state is None:
        return x.to(out_dtype)
    spikes, state.mem = scan_torch(x, threshold, leak, state.mem.to(torch.float32))
    if state.counts is not None:
        v = spikes if valid is None else spikes * valid.view(1, -1, 1).to(spikes.dtype)
        state.counts[t0:t0 + spikes.shape[0]] += v.sum(dim=(1, 2)).to(torch.int32)
    if state.weighted is not None:
        for s in spikes:
            state.weighted.mul_(leak).add_(s)
    return spikes.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (CUDA, or its CPU interpreter with ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def use_triton(t: Tensor) -> bool:
    """Whether the Triton kernels run for tensors on ``t``'s device."""
    if not triton_available():
        return False
    return t.is_cuda or (_interpreting() and t.device.type == "cpu")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def scan_blocks(width: int, norm: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_W, num_warps) of a scan program: ~4096 neurons a program; a LayerNorm
    program holds whole rows."""
    if norm:
        bw = next_pow2(width)
        br = max(1, min(16, 2048 // bw))
    else:
        bw = min(256, next_pow2(width))
        br = max(1, 4096 // bw)
    return br, bw, 8 if br * bw >= 4096 and not norm else 4


def scan(current: Tensor, state: ScanState | None, *, t0: int = 0, timesteps: int | None = None,
         scale: Tensor | None = None, bias: Tensor | None = None, gelu: bool = False,
         residual: Tensor | None = None, norm: tuple[Tensor, Tensor, float] | None = None,
         threshold: float = 1.0, leak: float = 1.0, valid: Tensor | None = None,
         out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Fused epilogue + IF scan; see :func:`scan_reference` for the definition.

    ``current`` (t, R, W) may have any strides with a contiguous last axis (a column slice of a
    wider accumulator); ``residual`` likewise. ``scale``/``bias``: (W,) fp32. Returns (t, R, W)
    in ``out_dtype`` (spikes, or the current itself when ``state`` is None).
    """
    if not use_triton(current):
        return scan_reference(current, state, t0=t0, timesteps=timesteps, scale=scale, bias=bias,
                              gelu=gelu, residual=residual, norm=norm, threshold=threshold, leak=leak,
                              valid=valid, out_dtype=out_dtype)
    if current.dim() == 2:
        if timesteps is None:
            raise ValueError("a constant (R, W) current needs timesteps")
        current = current.unsqueeze(0).expand(timesteps, *current.shape)
    T, R, W = current.shape
    for x in (current, residual):
        if x is not None and x.stride(-1) != 1:
            raise ValueError("scan needs the last axis contiguous")
    out = torch.empty((T, R, W), device=current.device, dtype=out_dtype)
    br, bw, nw = scan_blocks(W, norm is not None)
    dummy = out
    do_scan = state is not None
    stats = do_scan and state.counts is not None
    if stats and valid is None:
        valid = torch.ones(R, device=current.device, dtype=torch.float32)
    mem = state.mem if do_scan else dummy
    if do_scan and (mem.dtype != torch.float32 or not mem.is_contiguous()):
        raise ValueError("the Triton scan keeps a contiguous fp32 membrane")
    kwargs = {} if _interpreting() else {"enable_fp_fusion": False}
    grid = (triton_cdiv(R, br), triton_cdiv(W, bw))
    partial = stats and SCAN_COUNTS == "partial"
    part = torch.empty((T, grid[1], R), device=current.device, dtype=torch.int32) if partial else dummy
    _kernels().scan_kernel[grid](
        current, current.stride(0), current.stride(1),
        scale if scale is not None else dummy, bias if bias is not None else dummy,
        residual if residual is not None else dummy,
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        norm[0] if norm is not None else dummy, norm[1] if norm is not None else dummy,
        float(norm[2]) if norm is not None else 0.0,
        mem, state.weighted if stats else dummy,
        state.counts[t0:] if stats else dummy, valid if stats else dummy,
        part, grid[1] * R if partial else 0,
        out, out.stride(0), out.stride(1),
        T, R, W, float(threshold), float(leak),
        SCALE=scale is not None, BIAS=bias is not None, GELU=gelu, RES=residual is not None,
        NORM=norm is not None, SCAN=do_scan, STATS=stats, PARTIAL=partial,
        BLOCK_R=br, BLOCK_W=bw, num_warps=nw, **kwargs)
    if partial:
        state.counts[t0:t0 + T] += part.sum(dim=(1, 2), dtype=torch.int32)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def scan_kernel(cur_ptr, stride_ct, stride_cr,
                    scale_ptr, bias_ptr,
                    res_ptr, stride_rt, stride_rr,
                    lnw_ptr, lnb_ptr, eps,
                    mem_ptr, wsum_ptr, cnt_ptr, valid_ptr, part_ptr, stride_pt,
                    out_ptr, stride_ot, stride_or,
                    T, R, W, threshold, leak,
                    SCALE: tl.constexpr, BIAS: tl.constexpr, GELU: tl.constexpr, RES: tl.constexpr,
                    NORM: tl.constexpr, SCAN: tl.constexpr, STATS: tl.constexpr, PARTIAL: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
        # One program: BLOCK_R tokens × BLOCK_W neurons, for every step t; its membrane and ASR
        # numerator stay in registers. Offsets are 64-bit (pointer increments), so t·R·W may
        # exceed 2^31.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        rmask = rows < R
        cmask = cols < W
        m2 = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        st = rows64[:, None] * W + cols[None, :]
        c_ptrs = cur_ptr + rows64[:, None] * stride_cr + cols[None, :]
        o_ptrs = out_ptr + rows64[:, None] * stride_or + cols[None, :]
        r_ptrs = res_ptr + rows64[:, None] * stride_rr + cols[None, :]
        p_ptrs = part_ptr + tl.program_id(1).to(tl.int64) * R + rows
        scale = tl.zeros((BLOCK_W,), dtype=tl.float32)
        bias = tl.zeros((BLOCK_W,), dtype=tl.float32)
        lnw = tl.zeros((BLOCK_W,), dtype=tl.float32)
        lnb = tl.zeros((BLOCK_W,), dtype=tl.float32)
        if SCALE:
            scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
        if BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        if NORM:
            lnw = tl.load(lnw_ptr + cols, mask=cmask, other=0.0)
            lnb = tl.load(lnb_ptr + cols, mask=cmask, other=0.0)
        mem = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
        wsum = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
        rv = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if SCAN:
            mem = tl.load(mem_ptr + st, mask=m2, other=0.0)
        if STATS:
            wsum = tl.load(wsum_ptr + st, mask=m2, other=0.0)
            rv = tl.load(valid_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        # Software prefetch: step t+1's current (and residual) is requested before step t is
        # computed, so that the load latency overlaps the arithmetic and the stores.
        x_raw = tl.load(c_ptrs, mask=m2, other=0.0)
        r_raw = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
        if RES:
            r_raw = tl.load(r_ptrs, mask=m2, other=0.0).to(tl.float32)
        for t in range(T):
            c_ptrs += stride_ct
            r_ptrs += stride_rt
            more = m2 & (t + 1 < T)
            x_nxt = tl.load(c_ptrs, mask=more, other=0.0)
            r_nxt = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
            if RES:
                r_nxt = tl.load(r_ptrs, mask=more, other=0.0).to(tl.float32)
            x = x_raw.to(tl.float32)
            if SCALE:
                x = x * scale[None, :]
            if BIAS:
                x = x + bias[None, :]
            if GELU:
                x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
            if RES:
                x = x + r_raw
            if NORM:
                x = tl.where(m2, x, 0.0)
                mean = tl.sum(x, axis=1) / W
                xc = tl.where(m2, x - mean[:, None], 0.0)
                var = tl.sum(xc * xc, axis=1) / W
                x = xc * (1.0 / tl.sqrt(var + eps))[:, None] * lnw[None, :] + lnb[None, :]
            if SCAN:
                mem = mem * leak + x
                spk = tl.where(mem > threshold, 1.0, 0.0)
                mem = mem - spk * threshold
                tl.store(o_ptrs, spk.to(out_ptr.dtype.element_ty), mask=m2)
                if STATS:
                    wsum = wsum * leak + spk
                    rc = tl.sum(tl.where(m2, spk, 0.0), axis=1) * rv  # (BLOCK_R,) valid spikes a row
                    if PARTIAL:  # row sums to a scratch buffer: no cross-warp reduction in the loop
                        tl.store(p_ptrs, rc.to(tl.int32), mask=rmask)
                        p_ptrs += stride_pt
                    else:
                        tl.atomic_add(cnt_ptr + t, tl.sum(rc, axis=0).to(tl.int32))
            else:
                tl.store(o_ptrs, x.to(out_ptr.dtype.element_ty), mask=m2)
            o_ptrs += stride_ot
            x_raw = x_nxt
            r_raw = r_nxt
        if SCAN:
            tl.store(mem_ptr + st, mem, mask=m2)
        if STATS:
            tl.store(wsum_ptr + st, wsum, mask=m2)

    class K:
        pass

    K.scan_kernel = scan_kernel
    return K


# ---------------------------------------------------------------------------------------------
# Spike products
# ---------------------------------------------------------------------------------------------

def operand_dtype(operand: str) -> torch.dtype:
    """Storage dtype of spikes and weights for an operand format."""
    return {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "bf16": torch.bfloat16,
            "fp32": torch.float32}[operand]


def spike_matmul_reference(x: Tensor, weight: Tensor) -> Tensor:
    """Definition of :func:`spike_matmul`: ``x @ weightᵀ`` accumulated in float64, (M, K) × (N, K)."""
    return x.to(torch.float64) @ weight.to(torch.float64).T


def spike_matmul(x: Tensor, weight: Tensor, operand: str, exact: bool = True) -> Tensor:
    """(M, K) spikes × (N, K) weights (both in ``operand_dtype(operand)``) -> (M, N) accumulator.

    ``fp8``: ``torch._scaled_mm`` with unit scales, fp16 output when K ≤ 2048 (exact integers),
    else fp32; ``int8``: ``torch._int_mm``, int32; ``bf16``/``fp32``: ``torch.mm`` with an fp32
    output. With ``exact`` (integer weights) every result is the exact integer sum.
    """
    if not x.is_cuda:
        return spike_matmul_reference(x, weight).to(torch.float32)
    M, K = x.shape
    if not cublas_shape_ok(operand, M, K, weight.shape[0]):
        # odd shapes: fp32 operands hold 0/±1 exactly (tf32 too), so the sums stay exact
        return torch.mm(x.to(torch.float32), weight.to(torch.float32).t())
    if operand == "fp8":
        one = torch.ones((), device=x.device, dtype=torch.float32)
        out = torch.float16 if exact and K <= 2048 else torch.float32
        return torch._scaled_mm(x, weight.t(), scale_a=one, scale_b=one, out_dtype=out)
    if operand == "int8":
        return torch._int_mm(x, weight.t())
    if operand == "bf16":
        try:
            return torch.mm(x, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            return torch.mm(x, weight.t())
    return torch.mm(x, weight.t())


def cublas_shape_ok(operand: str, M: int, K: int, N: int) -> bool:
    """Whether cuBLAS takes these shapes in this operand format: fp8 ``_scaled_mm`` needs K and N
    multiples of 16; int8 ``_int_mm`` needs M > 16 and K, N multiples of 8."""
    if operand == "fp8":
        return K % 16 == 0 and N % 16 == 0
    if operand == "int8":
        return M > 16 and K % 8 == 0 and N % 8 == 0
    return True


def exact_product_cpu(x: Tensor, values_bf16: Tensor, x_bf16: Tensor | None = None,
                      keep_bf16: bool = False, acc_dtype: torch.dtype | None = None) -> Tensor:
    """Exact ``x @ valuesᵀ`` for 0/1 ``x`` and integer ``values`` (|v| ≤ 1), via bf16 products.

    bf16 products accumulate in fp32 and round the output to bf16, which holds every integer up to
    256; so K is cut into slices of at most 256 and the slices summed in x's dtype — all exact, so
    the result equals ``F.linear(x, values)`` in float32 or float64 bit for bit, at about three
    times the speed of an fp32 product on CPUs with bf16 instructions. ``x``: (..., K);
    ``x_bf16``: the same values already in bf16, if the caller has them. ``keep_bf16``: where one
    product suffices (K ≤ 256), return its exact bf16 result unconverted (a caller that multiplies
    it by a scale in x's dtype converts it in the same pass). ``acc_dtype``: the dtype of the
    result and of the slices' sum (default: x's, or float32 when x is itself bf16 spikes — a bf16
    sum of two slices would round integers above 256).
    """
    K = x.shape[-1]
    if acc_dtype is None:
        acc_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xb = x.to(torch.bfloat16) if x_bf16 is None else x_bf16
    if K <= EXACT_BF16_K:
        out = F.linear(xb, values_bf16)
        return out if keep_bf16 else out.to(acc_dtype)
    out = None
    for k0 in range(0, K, EXACT_BF16_K):
        part = F.linear(xb[..., k0:k0 + EXACT_BF16_K], values_bf16[:, k0:k0 + EXACT_BF16_K]).to(acc_dtype)
        out = part if out is None else out.add_(part)
    return out
