r"""A compiled neuron scan for the CPU: the multi-step engine's per-site time loop in one C pass.

:func:`kernels.scan_torch` runs a site's neuron over t steps as three or four PyTorch operations
a step; at the tiny configuration on two cores that per-step work (and the recorder's passes over
the spikes) was most of the fast engine's time. :func:`scan` does the same arithmetic in one pass
of C per block of 256 neurons, the membrane and the ASR numerator held in a local array for all
t steps, and

* writes the spikes in the model's dtype, and optionally also as bf16 (the operand of the next
  layer's exact binary/ternary product, saving a conversion pass);
* counts the spikes of valid tokens at every step and updates the ASR numerator
  Σ γ^{t-τ} s[τ] as it goes (what :meth:`Recorder.block` would compute in two more passes).

**Exactness.** Per neuron and step the C code does what ``scan_torch`` does, in the same order
and precision: ``u ← u·γ`` (skipped when γ = 1, as there), ``u ← u + x``, ``s = [u > V_th]``,
``u ← u − V_th·s``; compiled with ``-ffp-contract=off`` so that no multiply-add is fused, its
spikes and membranes equal PyTorch's bit for bit in float32 and float64
(``tests/test_native.py``).

**Build.** The C source below is compiled once per machine with the system C compiler (``$CC``,
else ``cc``) into ``$SPIKINGBERT_CACHE`` (default ``~/.cache/spikingbert_sim``), written
atomically, and loaded with :mod:`ctypes`; with OpenMP (``-fopenmp``, resolved to the libgomp
that PyTorch has loaded) its rows are split over ``torch.get_num_threads()`` threads. Where no
compiler is found or the build fails, or with ``SPIKINGBERT_NATIVE=0``, :func:`available` is False
and the engine keeps ``scan_torch``.

**Allocation.** A multi-step chunk's tensors are megabytes each; glibc serves such blocks with
fresh ``mmap`` pages (or trims them off the heap when freed), so every chunk pays the page faults
of its allocations again, which measured a third of the fast engine's time on two cores.
:func:`tune_malloc` (called by the engine on its first CPU run; ``SPIKINGBERT_MALLOC=0`` leaves
malloc alone) raises glibc's mmap threshold to 32 MB and its trim threshold to 256 MB, so freed
blocks are reused: the process keeps up to 256 MB of freed heap instead of returning it at once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

BLOCK = 1024
"""Neurons whose state a C loop keeps in a local array over all t steps (a group of rows, or a
block of one wide row's columns)."""

MIN_SPLIT = 1 << 15
"""Fewest (step, neuron) updates per thread worth a thread of its own."""

_HEADER = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK %(block)d

static inline float bf16_to_float(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
"""

# One instantiation per floating type (REAL: float, double). Every inner loop is branch-free over
# a block of at most BLOCK neurons held in local arrays, so that the compiler vectorizes it.
_PER_TYPE = r"""
/* Rows r0..r1-1 (g = r1 - r0 rows, g·n ≤ BLOCK neurons of columns j0..j0+n-1 each), all T steps:
   their membranes stay in a local array, and each step reads and writes g runs of n values. */
static void %(name)s_rows(const REAL *cur, const uint16_t *cur16, const REAL *scale,
                          const REAL *bias, int64_t cur_ts, int64_t cur_rs,
                          REAL *out, uint16_t *out_bf16, int64_t out_ts, int64_t out_rs,
                          REAL *mem, REAL *wsum, const uint8_t *valid, int64_t *counts,
                          int64_t T, int64_t r0, int64_t r1, int64_t j0, int64_t n, int64_t W,
                          const REAL th, const REAL leak)
{
    const int leaky = leak != (REAL)1;
    const int64_t g = r1 - r0;
    REAL m[BLOCK], w[BLOCK], x[BLOCK], sp[BLOCK];
    for (int64_t i = 0; i < g; ++i) {
        const REAL *restrict mp = mem + (r0 + i) * W + j0;
        for (int64_t j = 0; j < n; ++j) m[i * n + j] = mp[j];
        if (wsum) {
            const REAL *restrict wp = wsum + (r0 + i) * W + j0;
            for (int64_t j = 0; j < n; ++j) w[i * n + j] = wp[j];
        }
    }
    /* rows laid end to end in every tensor (a whole-width site): one run of g·n values a step */
    const int flat = g > 1 && n == W && cur_rs == W && out_rs == W;
    const int64_t runs = flat ? 1 : g, len = flat ? g * n : n;
    for (int64_t t = 0; t < T; ++t) {
        int64_t cnt = 0;
        for (int64_t i = 0; i < runs; ++i) {
            const int64_t r = r0 + i;
            REAL *restrict mi = m + i * len, *restrict si = sp + i * len;
            const REAL *restrict c = x;
            if (cur16) { /* (acc * scale) + bias, each rounded, as the unfused operations */
                const uint16_t *restrict a = cur16 + t * cur_ts + r * cur_rs + j0;
                for (int64_t k = 0; k < len; k += n) {
                    const REAL *restrict sc = scale + j0;
                    for (int64_t j = 0; j < n; ++j) x[k + j] = (REAL)bf16_to_float(a[k + j]) * sc[j];
                    if (bias) {
                        const REAL *restrict bi = bias + j0;
                        for (int64_t j = 0; j < n; ++j) x[k + j] = x[k + j] + bi[j];
                    }
                }
            } else c = cur + t * cur_ts + r * cur_rs + j0;
            if (leaky) for (int64_t j = 0; j < len; ++j) mi[j] = mi[j] * leak;
            int32_t fired_run = 0;
            for (int64_t j = 0; j < len; ++j) {
                const REAL u = mi[j] + c[j];
                const int fired = u > th;
                const REAL s = fired ? (REAL)1 : (REAL)0;
                mi[j] = u - s * th;
                si[j] = s;
                fired_run += fired;
            }
            if (out) {
                REAL *restrict o = out + t * out_ts + r * out_rs + j0;
                for (int64_t j = 0; j < len; ++j) o[j] = si[j];
            }
            if (out_bf16) {
                uint16_t *restrict ob = out_bf16 + t * out_ts + r * out_rs + j0;
                for (int64_t j = 0; j < len; ++j) ob[j] = si[j] != (REAL)0 ? 0x3F80 : 0;
            }
            if (!counts) continue;
            if (valid == 0) cnt += fired_run;
            else if (!flat) cnt += valid[r] ? fired_run : 0;
            else for (int64_t q = 0; q < g; ++q) {  /* valid rows only */
                if (!valid[r0 + q]) continue;
                int32_t f = 0;
                for (int64_t j = 0; j < n; ++j) f += si[q * n + j] != (REAL)0;
                cnt += f;
            }
        }
        if (wsum) {
            if (leaky) for (int64_t k = 0; k < g * n; ++k) w[k] = w[k] * leak + sp[k];
            else for (int64_t k = 0; k < g * n; ++k) w[k] = w[k] + sp[k];
        }
        if (counts) counts[t] += cnt;
    }
    for (int64_t i = 0; i < g; ++i) {
        REAL *restrict mp = mem + (r0 + i) * W + j0;
        for (int64_t j = 0; j < n; ++j) mp[j] = m[i * n + j];
        if (wsum) {
            REAL *restrict wp = wsum + (r0 + i) * W + j0;
            for (int64_t j = 0; j < n; ++j) wp[j] = w[i * n + j];
        }
    }
}

int %(name)s(const REAL *cur, const uint16_t *cur16, const REAL *scale, const REAL *bias,
             int64_t cur_ts, int64_t cur_rs,
             REAL *out, uint16_t *out_bf16, int64_t out_ts, int64_t out_rs,
             REAL *mem, REAL *wsum, const uint8_t *valid, int64_t *counts,
             int64_t T, int64_t R, int64_t W, double threshold, double leak, int threads)
{
    /* work items: groups of g rows of all W columns when W fits a block, else single rows cut
       into column blocks */
    const int64_t n = W < BLOCK ? W : BLOCK;
    const int64_t g = W < BLOCK ? (BLOCK / (W > 0 ? W : 1)) : 1;
    const int64_t colblocks = (W + n - 1) / (n > 0 ? n : 1);
    const int64_t groups = (R + g - 1) / g;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        int64_t *local = 0;
        if (counts) {
            local = (int64_t *)calloc((size_t)(T > 0 ? T : 1), sizeof(int64_t));
            if (!local) failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < groups * colblocks; ++item) {
            if (counts && !local) continue;
            const int64_t r0 = (item / colblocks) * g, j0 = (item %% colblocks) * n;
            const int64_t r1 = r0 + g < R ? r0 + g : R;
            %(name)s_rows(cur, cur16, scale, bias, cur_ts, cur_rs, out, out_bf16, out_ts, out_rs,
                          mem, wsum, valid, local, T, r0, r1, j0, W - j0 < n ? W - j0 : n, W,
                          (REAL)threshold, (REAL)leak);
        }
        if (local) {
            #pragma omp critical
            for (int64_t t = 0; t < T; ++t) counts[t] += local[t];
            free(local);
        }
    }
    return failed;
}

/* out[r] = (acc[r]*scale + bias) + residual[r] over rows r, each operation rounded to REAL as
   PyTorch's mul, add_ and add_ would: acc and residual are bf16 (small integers, 0/1 spikes). */
void %(affine)s(const uint16_t *acc, int64_t acc_rs, const REAL *scale, const REAL *bias,
                const uint16_t *res, int64_t res_rs, REAL *out, int64_t out_rs,
                int64_t R, int64_t W, int threads)
{
    #pragma omp parallel for num_threads(threads) if(threads > 1) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const uint16_t *restrict a = acc + r * acc_rs;
        REAL *restrict o = out + r * out_rs;
        for (int64_t j = 0; j < W; ++j) o[j] = (REAL)bf16_to_float(a[j]) * scale[j];
        if (bias) for (int64_t j = 0; j < W; ++j) o[j] = o[j] + bias[j];
        if (res) {
            const uint16_t *restrict p = res + r * res_rs;
            for (int64_t j = 0; j < W; ++j) o[j] = o[j] + (REAL)bf16_to_float(p[j]);
        }
    }
}
"""

_SOURCE = _HEADER % {"block": BLOCK} + "".join(
    "\n#define REAL %s\n" % real + _PER_TYPE % {"name": "scan_" + tag, "affine": "affine_" + tag} + "#undef REAL\n"
    for real, tag in (("float", "f32"), ("double", "f64")))

_FLAGS = ["-O3", "-std=gnu99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]


def _cpu_tag() -> str:
    """What the compiled code depends on: the instruction set (built with -march=native)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + platform.system() + flags


def cache_dir() -> Path:
    env = os.environ.get("SPIKINGBERT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spikingbert_sim"


def _build(directory: Path, flags: list[str]) -> Path:
    """Compile the source into ``directory`` (atomically) unless it is there; return the library."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler!r}) on PATH")
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *flags, _cpu_tag(), sys.version]).encode()).hexdigest()[:16]
    lib = directory / f"scan-{key}.so"
    if lib.exists():
        return lib
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / "scan.c"
        src.write_text(_SOURCE)
        built = Path(tmp) / "scan.so"
        proc = subprocess.run([compiler, *flags, str(src), "-o", str(built)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"{compiler} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        os.replace(built, lib)  # atomic: another process sees the whole library or none
    return lib


@functools.lru_cache(maxsize=None)
def _library():
    """The loaded library, or None (no compiler, a failed build, or SPIKINGBERT_NATIVE=0)."""
    if os.environ.get("SPIKINGBERT_NATIVE", "1") == "0":
        return None
    errors = []
    for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"spikingbert_sim-{os.getuid()}"):
        # OpenMP (the process's libgomp, which PyTorch already loaded) and -march=native where the
        # compiler has them
        for flags in (_FLAGS + ["-fopenmp", "-march=native"], _FLAGS + ["-march=native"], _FLAGS):
            try:
                lib = ctypes.CDLL(str(_build(directory, flags)))
            except OSError as e:
                errors.append(str(e))
                continue
            args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_double, ctypes.c_double, ctypes.c_int]
            for fn in (lib.scan_f32, lib.scan_f64):
                fn.argtypes, fn.restype = args, ctypes.c_int
            for fn in (lib.affine_f32, lib.affine_f64):
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
                fn.restype = None
            return lib
    warnings.warn("spikingbert_sim: the compiled CPU scan is unavailable, using PyTorch's "
                  f"(slower; {errors[-1] if errors else 'unknown error'})", RuntimeWarning, stacklevel=3)
    return None


def available() -> bool:
    """Whether :func:`scan` runs (a C compiler built the kernel, and it is not switched off)."""
    return _library() is not None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 << 20


@functools.lru_cache(maxsize=None)
def tune_malloc() -> bool:
    """Keep glibc from returning the engine's freed multi-megabyte blocks to the OS between
    chunks (see the module's notes); once per process. True when the settings took effect."""
    if os.environ.get("SPIKINGBERT_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def scan(current: Tensor, mem: Tensor, *, threshold: float = 1.0, leak: float = 1.0,
         out: Tensor | None = None, out_bf16: Tensor | None = None, float_out: bool = True,
         weighted: Tensor | None = None, counts: Tensor | None = None,
         valid: Tensor | None = None, scale: Tensor | None = None,
         bias: Tensor | None = None) -> Tensor:
    """Run the neuron over ``current`` (t, R, W) from membrane ``mem`` (R, W), updating ``mem``.

    ``current`` may instead be a bf16 product accumulator (exact small integers) with ``scale``
    (W,) and optionally ``bias`` (W,) in ``mem``'s dtype: the neuron then takes
    ``(current·scale) + bias`` computed on the fly, rounded as PyTorch's ``mul`` and ``add_`` (the
    currents of a binary/ternary layer, never written to memory).

    ``current`` may be a stride-0 expansion over t and a column slice of a wider tensor (rows of
    stride ≥ W, contiguous last axis); ``out`` (t, R, W) likewise (allocated when None), and
    ``out_bf16`` (same strides as ``out``) receives the spikes as bf16. With ``float_out=False``
    only ``out_bf16`` is written (no spikes in ``current``'s dtype). ``weighted`` (R, W),
    contiguous, is updated to γ·weighted + s at every step; ``counts`` (t,) int64 gets, at each
    step, the number of spikes at rows where ``valid`` (R,) is nonzero (all rows when None).
    ``mem`` must be contiguous and of ``current``'s dtype (float32 or float64). Returns the
    spikes: ``out``, or ``out_bf16`` without ``float_out``.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled scan is unavailable (see native.available())")
    T, R, W = current.shape
    fused = current.dtype == torch.bfloat16
    dtype = mem.dtype if fused else current.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the compiled scan runs float32 or float64 (or a bf16 accumulator with a scale), not {dtype}")
    if fused != (scale is not None) or (bias is not None and scale is None):
        raise ValueError("scale (and bias) go with a bf16 accumulator as current, and only with it")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and (t.dtype != dtype or t.shape != (W,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {dtype} (W,) tensor")
    if not float_out and (out is not None or out_bf16 is None):
        raise ValueError("float_out=False writes out_bf16 only: pass out_bf16 and no out")
    if out is None and float_out:
        out = torch.empty((T, R, W), dtype=dtype)
    for name, t, want in (("current", current, torch.bfloat16 if fused else dtype), ("out", out, dtype),
                          ("out_bf16", out_bf16, torch.bfloat16)):
        if t is not None and (t.device.type != "cpu" or t.dtype != want or t.shape != (T, R, W)
                              or (W > 1 and t.stride(2) != 1)):
            raise ValueError(f"{name} must be a CPU {want} (t, R, W) tensor with a contiguous last axis")
    if out is not None and out_bf16 is not None and out_bf16.stride() != out.stride():
        raise ValueError("out_bf16 must have out's strides")
    for name, t in (("mem", mem), ("weighted", weighted)):
        if t is not None and (t.dtype != dtype or t.shape != (R, W) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {dtype} (R, W) tensor")
    if counts is not None and (counts.dtype != torch.int64 or counts.shape != (T,)):
        raise ValueError("counts must be an int64 (t,) tensor")
    if valid is not None:
        valid = valid.reshape(R).to(torch.uint8).contiguous()
    fn = lib.scan_f32 if dtype == torch.float32 else lib.scan_f64
    threads = max(1, min(torch.get_num_threads(), R, (T * R * W) // MIN_SPLIT))
    layout = out if out is not None else out_bf16
    failed = fn(None if fused else current.data_ptr(), current.data_ptr() if fused else None,
                _ptr(scale), _ptr(bias), current.stride(0), current.stride(1),
                _ptr(out), _ptr(out_bf16), layout.stride(0), layout.stride(1),
                mem.data_ptr(), _ptr(weighted), _ptr(valid), _ptr(counts),
                T, R, W, float(threshold), float(leak), threads)
    if failed:
        raise MemoryError("the compiled scan could not allocate its step counts")
    return out if float_out else out_bf16


def affine(acc: Tensor, scale: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
           out: Tensor | None = None) -> Tensor:
    """``(acc·scale + bias) + residual`` in ``scale``'s dtype (float32 or float64), in one pass.

    ``acc`` (..., W): a bf16 product accumulator (exact small integers); ``residual``: bf16 0/1
    spikes of the same shape, or None. Each operation is rounded as PyTorch's ``mul``, ``add_``
    and ``add_`` in that order would round it, so the result equals theirs bit for bit. Any
    leading-axes layout whose rows merge into one stride (a column slice of a contiguous tensor)
    is accepted; ``out`` is allocated contiguous when None.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled kernels are unavailable (see native.available())")
    dtype, W = scale.dtype, acc.shape[-1]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"affine runs float32 or float64, not {dtype}")
    if out is None:
        out = torch.empty(acc.shape, dtype=dtype)

    def rows(name: str, t: Tensor | None, want: torch.dtype) -> Tensor | None:
        if t is None:
            return None
        if t.dtype != want or t.device.type != "cpu" or t.shape != acc.shape or (W > 1 and t.stride(-1) != 1):
            raise ValueError(f"{name} must be a CPU {want} tensor of shape {tuple(acc.shape)} with a contiguous last axis")
        try:
            return t.view(-1, W)
        except RuntimeError:
            raise ValueError(f"{name}'s rows must merge into one stride") from None

    a, r, o = rows("acc", acc, torch.bfloat16), rows("residual", residual, torch.bfloat16), rows("out", out, dtype)
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and (t.dtype != dtype or t.shape != (W,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {dtype} (W,) tensor")
    R = a.shape[0]
    threads = max(1, min(torch.get_num_threads(), R, (R * W) // MIN_SPLIT))
    fn = lib.affine_f32 if dtype == torch.float32 else lib.affine_f64
    fn(a.data_ptr(), a.stride(0), scale.data_ptr(), _ptr(bias), _ptr(r), 0 if r is None else r.stride(0),
       o.data_ptr(), o.stride(0), R, W, threads)
    return out
