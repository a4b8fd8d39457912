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

Two more passes serve the engine's binary/ternary products, whose bf16 accumulators hold exact
small integers: :func:`affine` turns an accumulator into currents, ``(acc·scale + bias) +
residual``, in one pass (PyTorch's ``mul`` first copies a bf16 tensor to float), and :func:`scan`
takes such an accumulator with its ``scale`` and ``bias`` directly, computing each current on the
fly (the key and value sites' currents are never written). Both read and write per-head layouts
(:func:`head_layout`: attention's Q, Kᵀ and V as (t, B, H, L, dh) or (t, B, H, dh, L) tensors, and
the context back), so attention's products need no re-layout copies.

On CPUs without bf16 instructions (AVX2-only machines, where oneDNN's bf16 product is a slow
reference loop) the products themselves run here too: :func:`accumulate` is the event-driven
product of a neuromorphic chip, each row adding the int16 weight rows of its firing inputs into
int16 accumulators (exact integers; with AVX2, up to 128 columns held in registers over all the
firing inputs, which are found from a bit mask of the row), with the scale, bias and residual
applied as it writes (:func:`kernels.cpu_spike_product` chooses between it, bf16 and float
products). :func:`scan` can sum such a product itself (``weight_t``): each row's currents are
summed from its input spikes at each step, scaled (or looked up in a table of a function of them,
:func:`product_table`: the intermediate layer's GELU) and fed to the neurons, never written to
memory.

**Exactness.** Per neuron and step the C code does what ``scan_torch`` does, in the same order
and precision: ``u ← u·γ`` (skipped when γ = 1, as there), ``u ← u + x``, ``s = [u > V_th]``,
``u ← u − V_th·s``; compiled with ``-ffp-contract=off`` so that no multiply-add is fused, its
spikes and membranes equal PyTorch's bit for bit in float32 and float64
(``tests/test_native.py``). ``-fno-trapping-math`` (no value changes: it only lets the compiler
ignore floating-point exception flags) lets GCC vectorize the threshold comparison with AVX2 as
it does with AVX-512's masks; without it an AVX2-only CPU ran the scan's step loop one neuron at
a time, with a branch per neuron (5× slower at 40 % firing, measured on a 2-core AMD EPYC).

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
from typing import NamedTuple

import torch
from torch import Tensor

BLOCK = 1024
"""Neurons whose state a C loop keeps in a local array over all t steps (a group of rows, or a
block of one wide row's columns)."""

ACCUMULATE_MAX_K = 32767
"""Longest input that :func:`accumulate`'s int16 accumulators sum exactly (|Σ| ≤ K)."""

MIN_SPLIT = 1 << 15
"""Fewest (step, neuron) updates per thread worth a thread of its own."""

_HEADER = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define BLOCK %(block)d
#define SUM_STEPS 8  /* a summing scan sums the currents of up to SUM_STEPS steps together */
#define SUM_ROWS 256  /* ... and of up to SUM_ROWS (step, row) pairs */
#define ACC_ROWS 16  /* accumulate() sums ACC_ROWS rows a tile of weights at a time */
#if defined(__GNUC__) && !defined(__clang__)
#define SCALAR_LOOP __attribute__((optimize("no-tree-vectorize")))
#else
#define SCALAR_LOOP
#endif

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
/* Where row r, column j of a (t, R, W) operand lives: t·ts + (r / lseq)·bs + (r %% lseq)·rs +
   (cols ? cols[j] : j). A plain row-major tensor has lseq = R (one "sequence"); a per-head layout
   such as (t, B, H, L, dh) has lseq = L and a column table. */
typedef struct { int64_t ts, rs, lseq, bs; const int64_t *cols; int64_t run; } %(name)s_layout;

/* The length of the runs of consecutive columns that lie side by side in a column table (a head's
   dh columns in a per-head layout), when every run has that length and it divides n; else 1. */
static int64_t %(name)s_run(const int64_t *cols, int64_t W, int64_t n)
{
    if (!cols || W < 1) return 1;
    int64_t run = 1;
    while (run < W && cols[run] == cols[run - 1] + 1) ++run;
    if (n %% run || W %% run) return 1;
    for (int64_t j = 0; j < W; ++j)
        if (cols[j] != cols[j - j %% run] + j %% run) return 1;
    return run;
}

static inline int64_t %(name)s_row(const %(name)s_layout *l, int64_t r)
{
    return (r / l->lseq) * l->bs + (r %% l->lseq) * l->rs;
}

/* d[0..len) = s[0..len): a per-head run (dh values), in whole 64-byte vectors where it can */
static inline void %(name)s_copy(REAL *restrict d, const REAL *restrict s, int64_t len)
{
    enum { VEC = 64 / (int)sizeof(REAL) };
    if (len %% VEC == 0) {
        for (int64_t k = 0; k < len; k += VEC)
            for (int q = 0; q < VEC; ++q) d[k + q] = s[k + q];
    } else for (int64_t k = 0; k < len; ++k) d[k] = s[k];
}

/* Bit j of the result: x[j] != 0, for j < n ≤ 64 (8 or 4 values a compare where AVX is built in). */
static inline uint64_t %(name)s_mask(const REAL *restrict x, int64_t n)
{
    uint64_t m = 0;
    int64_t j = 0;
#if defined(__AVX__)
#if REAL_IS_DOUBLE
    const __m256d z = _mm256_setzero_pd();
    for (; j + 4 <= n; j += 4)
        m |= (uint64_t)(unsigned)_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x + j), z, _CMP_NEQ_UQ)) << j;
#else
    const __m256 z = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8)
        m |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), z, _CMP_NEQ_UQ)) << j;
#endif
#endif
    for (; j < n; ++j) m |= (uint64_t)(x[j] != (REAL)0) << j;
    return m;
}

/* The firing inputs of a row of K spikes as bits: word k / 64, bit k %% 64 (x[k] != 0). */
static inline void %(name)s_words(const REAL *restrict x, int64_t K, uint64_t *restrict words)
{
    for (int64_t k0 = 0; k0 < K; k0 += 64)
        words[k0 / 64] = %(name)s_mask(x + k0, K - k0 < 64 ? K - k0 : 64);
}

/* A row's input spikes as bits: given (xb + off), or found from the float spikes (x + off) into buf. */
static inline const uint64_t *%(name)s_row_bits(const REAL *x, const uint64_t *xb, int64_t off, int64_t K,
                                                uint64_t *buf)
{
    if (xb) return xb + off;
    %(name)s_words(x + off, K, buf);
    return buf;
}

/* d[j] = (d[j] + bias[j]) + residual[j], each addition rounded to REAL as PyTorch's add_ would; the
   residual bf16 (res16: 0/1 spikes) or REAL (res); any of the three may be absent. */
static inline void %(name)s_bias_residual(REAL *restrict d, const REAL *restrict bias,
                                          const uint16_t *restrict res16, const REAL *restrict res, int64_t n)
{
    if (bias) for (int64_t j = 0; j < n; ++j) d[j] = d[j] + bias[j];
    if (res16) for (int64_t j = 0; j < n; ++j) d[j] = d[j] + (REAL)bf16_to_float(res16[j]);
    else if (res) for (int64_t j = 0; j < n; ++j) d[j] = d[j] + res[j];
}

/* d[j] = ((a[j]·scale[j]) + bias[j]) + res[j] from integer sums a, rounded as PyTorch's mul, add_,
   add_; without a scale the sums themselves (then no bias or residual either). */
static inline void %(name)s_from_sums(REAL *restrict d, const int16_t *restrict a, const REAL *restrict scale,
                                      const REAL *restrict bias, const REAL *restrict res, int64_t n)
{
    if (scale) for (int64_t j = 0; j < n; ++j) d[j] = (REAL)a[j] * scale[j];
    else for (int64_t j = 0; j < n; ++j) d[j] = (REAL)a[j];
    %(name)s_bias_residual(d, bias, 0, res, n);
}

/* acc[r·stride + j] = Σ over the set bits k of rows[r][0..nw) of w[k·N + j], for r < nr and j < nb,
   int16 (exact: |Σ| ≤ K ≤ 32767). Where AVX2 is built in, 16 columns a register and up to 8
   registers held over all of a row's firing inputs (each: one load and one add per register), a
   tile of such columns at a time for all the rows, so that the tile's weights come from the cache
   once for them all; the columns past the last whole register, or every column without AVX2,
   through an array. */
#if defined(__AVX2__)
static inline __attribute__((always_inline)) void %(name)s_tile(const int16_t *restrict w, int64_t N,
        const uint64_t *restrict words, int64_t nw, uint64_t last, int16_t *restrict acc, const int nv)
{
    __m256i a[8];
    for (int v = 0; v < nv; ++v) a[v] = _mm256_setzero_si256();
    for (int64_t q = 0; q < nw; ++q)
        for (uint64_t m = q == nw - 1 ? words[q] & last : words[q]; m; m &= m - 1) {
            const __m256i *wr = (const __m256i *)(w + (q * 64 + __builtin_ctzll(m)) * N);
            for (int v = 0; v < nv; ++v) a[v] = _mm256_add_epi16(a[v], _mm256_loadu_si256(wr + v));
        }
    for (int v = 0; v < nv; ++v) _mm256_storeu_si256((__m256i *)acc + v, a[v]);
}
#endif

static void %(name)s_sum(const int16_t *restrict w, int64_t N, const uint64_t *const *rows, int64_t nr,
                         int64_t K, int16_t *restrict acc, int64_t stride, int64_t nb)
{
    /* the bits of inputs K.. in the last word (given bits need not be clear there) are ignored */
    const int64_t nw = (K + 63) / 64;
    const uint64_t last = K %% 64 ? ((uint64_t)1 << (K %% 64)) - 1 : ~(uint64_t)0;
    int64_t j0 = 0;
#if defined(__AVX2__)
    while (nb - j0 >= 16) {
        const int64_t left = (nb - j0) / 16;
        const int nv = left < 8 ? (int)left : 8;
        for (int64_t r = 0; r < nr; ++r) {
            int16_t *restrict ar = acc + r * stride + j0;
            switch (nv) {  /* a constant register count each: the registers stay registers */
                case 8: %(name)s_tile(w + j0, N, rows[r], nw, last, ar, 8); break;
                case 7: %(name)s_tile(w + j0, N, rows[r], nw, last, ar, 7); break;
                case 6: %(name)s_tile(w + j0, N, rows[r], nw, last, ar, 6); break;
                case 5: %(name)s_tile(w + j0, N, rows[r], nw, last, ar, 5); break;
                case 4: %(name)s_tile(w + j0, N, rows[r], nw, last, ar, 4); break;
                case 3: %(name)s_tile(w + j0, N, rows[r], nw, last, ar, 3); break;
                case 2: %(name)s_tile(w + j0, N, rows[r], nw, last, ar, 2); break;
                default: %(name)s_tile(w + j0, N, rows[r], nw, last, ar, 1); break;
            }
        }
        j0 += 16 * (int64_t)nv;
    }
#endif
    if (j0 == nb) return;
    for (int64_t r = 0; r < nr; ++r) {
        int16_t *restrict ar = acc + r * stride;
        for (int64_t j = j0; j < nb; ++j) ar[j] = 0;
        for (int64_t q = 0; q < nw; ++q)
            for (uint64_t m = q == nw - 1 ? rows[r][q] & last : rows[r][q]; m; m &= m - 1) {
                const int16_t *restrict w0 = w + (q * 64 + __builtin_ctzll(m)) * N;
                for (int64_t j = j0; j < nb; ++j) ar[j] = (int16_t)(ar[j] + w0[j]);
            }
    }
}

/* xi[j] = lt[a[j]·wN + j]: f((sum·scale) + bias) tabulated per column for every possible sum
   (lt: the row of sum 0), one load each: AVX2 gathers measured no faster, GCC's 1.5x slower (AMD Zen 3) */
SCALAR_LOOP static void %(name)s_lookup(REAL *restrict xi, const REAL *restrict lt, const int16_t *restrict a,
                                        int64_t wN, int64_t n)
{
    for (int64_t j = 0; j < n; ++j) xi[j] = lt[(int64_t)a[j] * wN + j];
}

/* Bytes of a summing scan's work buffer: currents and sums of SUM_STEPS·BLOCK neurons, and the
   input bits of up to BLOCK rows. */
static size_t %(name)s_work(int64_t K)
{
    return (size_t)SUM_STEPS * BLOCK * (sizeof(REAL) + sizeof(int16_t)) + (size_t)BLOCK * ((K + 63) / 64) * 8;
}

/* Rows r0..r1-1 (g = r1 - r0 rows, g·n ≤ BLOCK neurons of columns j0..j0+n-1 each), all T steps:
   their membranes stay in a local array; each step's currents are read (or gathered) into, and its
   spikes written (or scattered) from, runs of g·n values. */
static void %(name)s_rows(const REAL *cur, const uint16_t *cur16, const REAL *scale,
                          const REAL *bias, const %(name)s_layout *in,
                          const REAL *spk, const uint64_t *spk_bits, int64_t spk_ts, int64_t spk_rs,
                          const int16_t *wt, int64_t K, int64_t wN, const REAL *lut, void *work,
                          REAL *out, uint16_t *out_bf16, const %(name)s_layout *ol,
                          uint64_t *out_bits, int64_t bits_ts, int64_t bits_rs,
                          REAL *mem, REAL *wsum, const uint8_t *valid, int64_t *counts,
                          int64_t T, int64_t r0, int64_t r1, int64_t j0, int64_t n, int64_t W,
                          const REAL th, const REAL leak)
{
    const int leaky = leak != (REAL)1;
    const int64_t g = r1 - r0, len = g * n;
    REAL m[BLOCK], w[BLOCK], x[BLOCK], sp[BLOCK];
    for (int64_t i = 0; i < g; ++i) {
        const REAL *restrict mp = mem + (r0 + i) * W + j0;
        for (int64_t j = 0; j < n; ++j) m[i * n + j] = mp[j];
        if (wsum) {
            const REAL *restrict wp = wsum + (r0 + i) * W + j0;
            for (int64_t j = 0; j < n; ++j) w[i * n + j] = wp[j];
        }
    }
    /* rows laid end to end (a whole-width site, row-major) are one run of g·n values */
    const int flat_in = !in->cols && n == W && in->rs == W && in->bs == in->lseq * W;
    const int flat_out = !ol->cols && n == W && ol->rs == W && ol->bs == ol->lseq * W;
    int64_t irow[BLOCK], orow[BLOCK];
    int trans_out = ol->cols != 0 && ol->run == 1 && g > 1;
    for (int64_t i = 0; i < g; ++i) {
        irow[i] = %(name)s_row(in, r0 + i);
        orow[i] = %(name)s_row(ol, r0 + i);
        trans_out = trans_out && orow[i] == orow[0] + i;
    }
    /* a summed product: the currents of tb steps at a time (tb·g ≤ max(g, SUM_ROWS) rows), so that
       each tile of weights is read once for all of them (work: %(name)s_work) */
    const int64_t nw = (K + 63) / 64;
    int64_t tb = g < SUM_ROWS ? SUM_ROWS / g : 1;
    if (tb > SUM_STEPS) tb = SUM_STEPS;
    REAL *xs = (REAL *)work;
    int16_t *as = (int16_t *)(xs + SUM_STEPS * BLOCK);
    uint64_t *ws = (uint64_t *)(as + SUM_STEPS * BLOCK);
    const uint64_t *rp[BLOCK];
    for (int64_t t = 0; t < T; ++t) {
        const REAL *restrict c = x;
        if (wt) {  /* a binary/ternary product's currents, summed here from its input spikes */
            if (t %% tb == 0) {
                const int64_t steps = T - t < tb ? T - t : tb, nr = steps * g;
                for (int64_t q = 0; q < nr; ++q)  /* spikes given as bits, or found from the float ones */
                    rp[q] = %(name)s_row_bits(spk, spk_bits, (t + q / g) * spk_ts + (r0 + q %% g) * spk_rs, K,
                                              ws + q * nw);
                %(name)s_sum(wt + j0, wN, rp, nr, K, as, n, n);
                for (int64_t q = 0; q < nr; ++q) {
                    if (lut) %(name)s_lookup(xs + q * n, lut + K * wN + j0, as + q * n, wN, n);
                    else %(name)s_from_sums(xs + q * n, as + q * n, scale + j0, bias ? bias + j0 : 0, 0, n);
                }
            }
            c = xs + (t %% tb) * len;
        } else if (scale) { /* (acc * scale) + bias, each rounded, as the unfused operations */
            const REAL *restrict sc = scale + j0, *restrict bi = bias ? bias + j0 : 0;
            for (int64_t i = 0; i < g; ++i) {
                REAL *restrict xi = x + i * n;
                if (cur16) {  /* a bf16 accumulator */
                    const uint16_t *restrict a = cur16 + t * in->ts + irow[i] + j0;
                    for (int64_t j = 0; j < n; ++j) xi[j] = (REAL)bf16_to_float(a[j]) * sc[j];
                } else {  /* a float one (products over K > 256, summed in slices) */
                    const REAL *restrict a = cur + t * in->ts + irow[i] + j0;
                    for (int64_t j = 0; j < n; ++j) xi[j] = a[j] * sc[j];
                }
                if (bi) for (int64_t j = 0; j < n; ++j) xi[j] = xi[j] + bi[j];
            }
        } else if (flat_in) c = cur + t * in->ts + irow[0] + j0;
        else for (int64_t i = 0; i < g; ++i) {
            const REAL *restrict ci = cur + t * in->ts + irow[i];
            REAL *restrict xi = x + i * n;
            if (in->cols) {
                const int64_t *restrict cc = in->cols + j0;
                const int64_t run = in->run;
                for (int64_t jj = 0; jj < n; jj += run)  /* runs of contiguous columns */
                    %(name)s_copy(xi + jj, ci + cc[jj], run);
            } else for (int64_t j = 0; j < n; ++j) xi[j] = ci[j0 + j];
        }
        if (leaky) for (int64_t k = 0; k < len; ++k) m[k] = m[k] * leak;
        int32_t fired_all = 0;
        /* fire and reset; the weighted spike sum in the same pass where it is kept */
#define FIRE(update) \
        for (int64_t k = 0; k < len; ++k) { \
            const REAL u = m[k] + c[k]; \
            const int fired = u > th; \
            const REAL s = fired ? (REAL)1 : (REAL)0; \
            m[k] = u - s * th; \
            sp[k] = s; \
            update; \
            fired_all += fired; \
        }
        if (!wsum) FIRE((void)0)
        else if (leaky) FIRE(w[k] = w[k] * leak + s)
        else FIRE(w[k] = w[k] + s)
#undef FIRE
        if (out_bits)  /* each row's spikes as bits, 64 to a word (a block of columns starts a word) */
            for (int64_t i = 0; i < g; ++i) {
                uint64_t *restrict ob = out_bits + t * bits_ts + (r0 + i) * bits_rs + j0 / 64;
                for (int64_t q = 0; q < n; q += 64) ob[q / 64] = %(name)s_mask(sp + i * n + q, n - q < 64 ? n - q : 64);
            }
        if (trans_out) {  /* a column's g rows are side by side (Kᵀ): write them together */
            const int64_t off = t * ol->ts + orow[0];
            const int64_t *restrict cc = ol->cols + j0;
            for (int64_t j = 0; j < n; ++j) {  /* column j of the g rows: g consecutive values */
                if (out) {
                    REAL *restrict d = out + off + cc[j];
                    for (int64_t i = 0; i < g; ++i) d[i] = sp[i * n + j];
                }
                if (out_bf16) {
                    uint16_t *restrict d = out_bf16 + off + cc[j];
                    for (int64_t i = 0; i < g; ++i) d[i] = (uint16_t)((sp[i * n + j] != (REAL)0) * 0x3F80);
                }
            }
        } else for (int64_t i = 0; i < (flat_out ? 1 : g); ++i) {
            const int64_t run = flat_out ? len : n, off = t * ol->ts + orow[i];
            const REAL *restrict si = sp + i * n;
            if (ol->cols) {
                const int64_t *restrict cc = ol->cols + j0;
                const int64_t cr = ol->run;
                for (int64_t jj = 0; jj < n; jj += cr) {  /* runs of contiguous columns */
                    if (out) %(name)s_copy(out + off + cc[jj], si + jj, cr);
                    if (out_bf16) {
                        uint16_t *restrict d = out_bf16 + off + cc[jj];
                        for (int64_t k = 0; k < cr; ++k) d[k] = (uint16_t)((si[jj + k] != (REAL)0) * 0x3F80);
                    }
                }
                continue;
            }
            if (out) {
                REAL *restrict o = out + off + j0;
                for (int64_t j = 0; j < run; ++j) o[j] = si[j];
            }
            if (out_bf16) {
                uint16_t *restrict ob = out_bf16 + off + j0;
                for (int64_t j = 0; j < run; ++j) ob[j] = (uint16_t)((si[j] != (REAL)0) * 0x3F80);
            }
        }
        if (!counts) continue;
        if (valid == 0) counts[t] += fired_all;
        else for (int64_t i = 0; i < g; ++i) {  /* valid rows only */
            if (!valid[r0 + i]) continue;
            int32_t f = 0;
            for (int64_t j = 0; j < n; ++j) f += sp[i * n + j] != (REAL)0;
            counts[t] += f;
        }
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
             int64_t cur_ts, int64_t cur_rs, int64_t cur_lseq, int64_t cur_bs, const int64_t *cur_cols,
             const REAL *spk, const uint64_t *spk_bits, int64_t spk_ts, int64_t spk_rs,
             const int16_t *wt, int64_t K, const REAL *lut,
             REAL *out, uint16_t *out_bf16, uint64_t *out_bits, int64_t bits_ts, int64_t bits_rs,
             int64_t out_ts, int64_t out_rs, int64_t out_lseq, int64_t out_bs, const int64_t *out_cols,
             REAL *mem, REAL *wsum, const uint8_t *valid, int64_t *counts,
             int64_t T, int64_t R, int64_t W, double threshold, double leak, int threads)
{
    /* work items: groups of g rows of all W columns when W fits a block, else single rows cut
       into column blocks */
    const int64_t n = W < BLOCK ? W : BLOCK;
    const %(name)s_layout in = {cur_ts, cur_rs, cur_lseq, cur_bs, cur_cols, %(name)s_run(cur_cols, W, n)};
    const %(name)s_layout ol = {out_ts, out_rs, out_lseq, out_bs, out_cols, %(name)s_run(out_cols, W, n)};
    const int64_t g = W < BLOCK ? (BLOCK / (W > 0 ? W : 1)) : 1;
    const int64_t colblocks = (W + n - 1) / (n > 0 ? n : 1);
    const int64_t groups = (R + g - 1) / g;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        int64_t *local = 0;
        if (counts) {
            local = (int64_t *)calloc((size_t)(T > 0 ? T : 1), sizeof(int64_t));
            if (!local) {
                #pragma omp atomic write
                failed = 1;
            }
        }
        void *work = 0;
        if (wt) {
            work = malloc(%(name)s_work(K));
            if (!work) {
                #pragma omp atomic write
                failed = 1;
            }
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < groups * colblocks; ++item) {
            if ((counts && !local) || (wt && !work)) continue;
            const int64_t r0 = (item / colblocks) * g, j0 = (item %% colblocks) * n;
            const int64_t r1 = r0 + g < R ? r0 + g : R;
            %(name)s_rows(cur, cur16, scale, bias, &in, spk, spk_bits, spk_ts, spk_rs, wt, K, W, lut, work,
                          out, out_bf16, &ol, out_bits, bits_ts, bits_rs,
                          mem, wsum, valid, local, T, r0, r1, j0, W - j0 < n ? W - j0 : n, W,
                          (REAL)threshold, (REAL)leak);
        }
        if (local) {
            #pragma omp critical
            for (int64_t t = 0; t < T; ++t) counts[t] += local[t];
            free(local);
        }
        free(work);
    }
    return failed;
}

/* out[r] = (acc[r]*scale + bias) + residual[r] over rows r, each operation rounded to REAL as
   PyTorch's mul, add_ and add_ would: acc is bf16 (small integers) or REAL (accf), the residual
   bf16 (0/1 spikes) or REAL (resf).
   out's row r, column j: (r / out_lseq)·out_bs + (r %% out_lseq)·out_rs + (out_cols ? out_cols[j] : j). */
void %(affine)s(const uint16_t *acc, const REAL *accf, int64_t acc_rs, const REAL *scale, const REAL *bias,
                const uint16_t *res, const REAL *resf, int64_t res_rs, REAL *out, int64_t out_rs,
                int64_t out_lseq, int64_t out_bs, const int64_t *out_cols,
                int64_t R, int64_t W, int threads)
{
    const int64_t run = %(name)s_run(out_cols, W, W < BLOCK ? W : BLOCK);
    #pragma omp parallel for num_threads(threads) if(threads > 1) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const uint16_t *restrict a = acc ? acc + r * acc_rs : 0;
        const REAL *restrict af = accf ? accf + r * acc_rs : 0;
        REAL v[BLOCK];
        REAL *restrict o = out + (r / out_lseq) * out_bs + (r %% out_lseq) * out_rs;
        for (int64_t j0 = 0; j0 < W; j0 += BLOCK) {
            const int64_t n = W - j0 < BLOCK ? W - j0 : BLOCK;
            REAL *restrict d = out_cols ? v : o + j0;
            if (a) for (int64_t j = 0; j < n; ++j) d[j] = (REAL)bf16_to_float(a[j0 + j]) * scale[j0 + j];
            else for (int64_t j = 0; j < n; ++j) d[j] = af[j0 + j] * scale[j0 + j];
            %(name)s_bias_residual(d, bias ? bias + j0 : 0, res ? res + r * res_rs + j0 : 0,
                                   resf ? resf + r * res_rs + j0 : 0, n);
            if (out_cols)
                for (int64_t jj = 0; jj < n; jj += run)  /* runs of contiguous columns */
                    %(name)s_copy(o + out_cols[j0 + jj], v + jj, run);
        }
    }
}

/* out[r, :] = Σ_k x[r, k]·wt[k, :] for 0/1 spikes x (R, K) and integer weights wt (K, N) in
   {-1, 0, 1} (int16), event-driven: each row's firing inputs are found from a bit mask per 64
   inputs, and their weight rows added into int16 accumulators (|sum| ≤ K ≤ 32767: exact), NB
   columns at a time. The sums are written as REAL (exact integers), or, with a scale, as
   ((sum·scale) + bias) + residual, each operation rounded to REAL as PyTorch's mul, add_ and add_
   would (the affine pass above, fused). A spike x that is neither 0 nor 1 counts as 1. With xb,
   the spikes are given as bits instead (row r: x_rs words from xb + r·x_rs, as scan writes them). */
#define NB 512
int %(accumulate)s(const REAL *x, const uint64_t *xb, int64_t x_rs, const int16_t *wt, REAL *out, int64_t out_rs,
                   const REAL *scale, const REAL *bias, const REAL *res, int64_t res_rs,
                   int64_t R, int64_t K, int64_t N, int threads)
{
    const int64_t nw = (K + 63) / 64, blocks = (R + ACC_ROWS - 1) / ACC_ROWS;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        /* per thread: the sums of ACC_ROWS rows and (float spikes) their input bits */
        int16_t *acc = (int16_t *)malloc(sizeof(int16_t) * ACC_ROWS * NB + (xb ? 0 : 8 * ACC_ROWS * nw));
        uint64_t *ws = acc ? (uint64_t *)(acc + ACC_ROWS * NB) : 0;
        if (!acc) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            if (!acc) continue;
            const int64_t b0 = blk * ACC_ROWS, nr = R - b0 < ACC_ROWS ? R - b0 : ACC_ROWS;
            const uint64_t *rp[ACC_ROWS];
            for (int64_t q = 0; q < nr; ++q)
                rp[q] = %(name)s_row_bits(x, xb, (b0 + q) * x_rs, K, ws + q * nw);
            for (int64_t n0 = 0; n0 < N; n0 += NB) {
                const int64_t nb = N - n0 < NB ? N - n0 : NB;
                %(name)s_sum(wt + n0, N, rp, nr, K, acc, NB, nb);
                for (int64_t q = 0; q < nr; ++q)  /* a bias or residual comes with a scale (accumulate() checks) */
                    %(name)s_from_sums(out + (b0 + q) * out_rs + n0, acc + q * NB, scale ? scale + n0 : 0,
                                       bias ? bias + n0 : 0, res ? res + (b0 + q) * res_rs + n0 : 0, nb);
            }
        }
        free(acc);
    }
    return failed;
}
#undef NB
"""

_SOURCE = _HEADER % {"block": BLOCK} + "".join(
    "\n#define REAL %s\n#define REAL_IS_DOUBLE %d\n" % (real, real == "double")
    + _PER_TYPE % {"name": "scan_" + tag, "affine": "affine_" + tag, "accumulate": "accumulate_" + tag}
    + "#undef REAL\n#undef REAL_IS_DOUBLE\n"
    for real, tag in (("float", "f32"), ("double", "f64")))

_FLAGS = ["-O3", "-std=gnu99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
_GCC_FLAGS = ["-fno-loop-unroll-and-jam"]
"""GCC 12's unroll-and-jam (on at -O3) turns :func:`accumulate`'s vectorized row additions into a
scalar loop over pairs of rows, 10× slower; compilers that do not know the flag build without it."""


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
        for flags in [f + g for f in (_FLAGS + _GCC_FLAGS, _FLAGS)
                      for g in (["-fopenmp", "-march=native"], ["-march=native"], [])]:
            try:
                lib = ctypes.CDLL(str(_build(directory, flags)))
            except OSError as e:
                errors.append(str(e))
                continue
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            args = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr,  # current, its layout
                    ptr, ptr, i64, i64, ptr, i64, ptr,  # or input spikes (or bits), weights, table
                    ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr,  # out, out_bf16, out_bits, layouts
                    ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_double, ctypes.c_double, ctypes.c_int]
            for fn in (lib.scan_f32, lib.scan_f64):
                fn.argtypes, fn.restype = args, ctypes.c_int
            for fn in (lib.affine_f32, lib.affine_f64):
                fn.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, ptr, i64, i64, ctypes.c_int]
                fn.restype = None
            for fn in (lib.accumulate_f32, lib.accumulate_f64):
                fn.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
                fn.restype = ctypes.c_int
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


class Layout(NamedTuple):
    """Where row ``r``, column ``j`` of a (t, R, W) operand lives in a contiguous tensor, in
    elements: ``t·ts + (r // lseq)·bs + (r % lseq)·rs + cols[j]`` (R = sequences × lseq tokens)."""

    ts: int
    lseq: int
    bs: int
    rs: int
    cols: Tensor | None  # None: column j at offset j (a row-major tensor)


def head_layout(batch: int, seq: int, heads: int, head_dim: int, transposed: bool = False) -> Layout:
    """The per-head layout of a (t, B, L, H·dh) operand: a (t, B, H, L, dh) tensor, or with
    ``transposed`` a (t, B, H, dh, L) one (attention's Kᵀ), so that the per-head products read
    contiguous operands with no re-layout copy."""
    D = heads * head_dim
    h = torch.arange(heads, dtype=torch.int64)[:, None]
    d = torch.arange(head_dim, dtype=torch.int64)[None, :]
    if transposed:
        return Layout(batch * D * seq, seq, D * seq, 1, (h * head_dim * seq + d * seq).reshape(-1).contiguous())
    return Layout(batch * D * seq, seq, D * seq, head_dim, (h * seq * head_dim + d).reshape(-1).contiguous())


def _check_columns(dtype: torch.dtype, W: int, **vectors: Tensor | None) -> None:
    """Per-column operands (a product's scale and bias): contiguous (W,) CPU tensors of ``dtype``."""
    for name, t in vectors.items():
        if t is not None and (t.dtype != dtype or t.shape != (W,) or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"{name} must be a contiguous {dtype} (W,) CPU tensor")


def _check_layout(name: str, t: Tensor, layout: Layout, T: int | None, R: int, W: int) -> None:
    """``T`` None: the steps are folded into the R rows (:func:`affine`), so ``layout.ts`` is unused.
    Every element the layout addresses must lie inside ``t``."""
    steps = 1 if T is None else T
    cols = layout.cols
    if not t.is_contiguous() or t.numel() != steps * R * W or (T is not None and layout.ts * T != t.numel()) \
            or layout.lseq < 1 or R % layout.lseq or cols.device.type != "cpu" \
            or cols.dtype != torch.int64 or cols.shape != (W,) or not cols.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of t·R·W elements matching its layout")
    if W and R and steps:
        per_step = t.numel() // steps
        last = (R // layout.lseq - 1) * layout.bs + (layout.lseq - 1) * layout.rs + int(cols.max())
        if min(layout.bs, layout.rs, int(cols.min())) < 0 or last >= per_step:
            raise ValueError(f"{name}'s layout addresses elements outside it")


def words(width: int) -> int:
    """64-bit words that hold ``width`` spikes as bits (:func:`scan`'s ``out_bits``)."""
    return -(-width // 64)


def _summed_input(spikes: Tensor, mem: Tensor, weight_t: Tensor, scale: Tensor | None, table: Tensor | None,
                  in_layout: Layout | None) -> tuple[Tensor, Tensor, int, Tensor]:
    """:func:`scan`'s checks of a binary/ternary product summed inside the scan; returns the
    spikes, a stand-in (t, R, W) current for the remaining checks (an expanded zero: no memory),
    K and the int16 weights."""
    R, W = mem.shape if mem.dim() == 2 else (-1, -1)
    if in_layout is not None:
        raise ValueError("input spikes are read row-major only (no in_layout)")
    bits = spikes.dtype == torch.int64
    if spikes.dim() != 3 or spikes.shape[1] != R or spikes.dtype not in (mem.dtype, torch.int64) \
            or spikes.device.type != "cpu":
        raise ValueError(f"with weight_t, current must be CPU {mem.dtype} input spikes (t, {R}, K) or their "
                         f"bits (int64 words), got {spikes.dtype} {tuple(spikes.shape)}")
    K = weight_t.shape[0] if bits and weight_t.dim() == 2 else spikes.shape[2]
    if bits and spikes.shape[2] != words(K):
        raise ValueError(f"{K} input spikes as bits take {words(K)} words a row, got {spikes.shape[2]}")
    if spikes.shape[2] > 1 and spikes.stride(2) != 1:
        spikes = spikes.contiguous()
    if weight_t.dtype not in (torch.int8, torch.int16) or weight_t.shape != (K, W) or not weight_t.is_contiguous():
        raise ValueError(f"weight_t must be a contiguous int8 or int16 ({K}, {W}) matrix, got {weight_t.dtype} "
                         f"{tuple(weight_t.shape)}")
    if not 0 < K <= ACCUMULATE_MAX_K:
        raise ValueError(f"a product summed in the scan has 1 to {ACCUMULATE_MAX_K} inputs, got {K}")
    if table is None and scale is None:
        raise ValueError("weight_t needs a scale or a table")
    if table is not None and (table.dtype != mem.dtype or table.shape != (2 * K + 1, W) or not table.is_contiguous()):
        raise ValueError(f"table must be a contiguous {mem.dtype} ({2 * K + 1}, {W}) tensor")
    stand_in = torch.zeros((), dtype=mem.dtype).expand(spikes.shape[0], R, W)
    return spikes, stand_in, K, weight_t.to(torch.int16)


def product_table(fn, scale: Tensor, bias: Tensor | None, K: int) -> Tensor:
    """``fn((s·scale) + bias)`` for every integer s in [-K, K], a (2K + 1, W) table for
    :func:`scan`'s ``table``: the product is rounded as PyTorch's ``mul`` and ``add_`` round it,
    and ``fn`` (an elementwise PyTorch function such as GELU) runs on one thread over a whole
    number of 64-value blocks, so that every entry is computed by its vectorized loop, as it is
    on a whole-width operand."""
    W = scale.shape[0]
    sums = torch.arange(-K, K + 1, dtype=scale.dtype)[:, None]
    pre = torch.mul(sums, scale)
    if bias is not None:
        pre.add_(bias)
    n = pre.numel()
    flat = torch.zeros(-(-n // 64) * 64, dtype=scale.dtype)
    flat[:n] = pre.reshape(-1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flat = fn(flat)
    finally:
        torch.set_num_threads(threads)
    return flat[:n].reshape(2 * K + 1, W).contiguous()


def scan(current: Tensor, mem: Tensor, *, threshold: float = 1.0, leak: float = 1.0,
         out: Tensor | None = None, out_bf16: Tensor | None = None, float_out: bool = True,
         weighted: Tensor | None = None, counts: Tensor | None = None,
         valid: Tensor | None = None, scale: Tensor | None = None,
         bias: Tensor | None = None, in_layout: Layout | None = None,
         out_layout: Layout | None = None, weight_t: Tensor | None = None,
         table: Tensor | None = None, out_bits: Tensor | None = None) -> Tensor:
    """Run the neuron over ``current`` (t, R, W) from membrane ``mem`` (R, W), updating ``mem``.

    With ``scale`` (W,) and optionally ``bias`` (W,) in ``mem``'s dtype, ``current`` is a product
    accumulator of exact integers (bf16, or ``mem``'s dtype for products summed in slices) and
    the neuron takes ``(current·scale) + bias`` computed on the fly, rounded as PyTorch's ``mul``
    and ``add_`` (the currents of a binary/ternary layer, never written to memory).

    ``current`` may be a stride-0 expansion over t and a column slice of a wider tensor (rows of
    stride ≥ W, contiguous last axis); ``out`` (t, R, W) likewise (allocated when None), and
    ``out_bf16`` (same strides as ``out``) receives the spikes as bf16. With ``float_out=False``
    only ``out_bf16`` is written (no spikes in ``current``'s dtype). ``weighted`` (R, W),
    contiguous, is updated to γ·weighted + s at every step; ``counts`` (t,) int64 gets, at each
    step, the number of spikes at rows where ``valid`` (R,) is nonzero (all rows when None).
    ``mem`` must be contiguous and of ``current``'s dtype (float32 or float64). Returns the
    spikes: ``out``, or ``out_bf16`` without ``float_out``.

    ``in_layout`` / ``out_layout`` (:func:`head_layout`): ``current`` / ``out`` and ``out_bf16``
    are contiguous tensors of another shape (t, B, H, L, dh), say, holding the (t, R, W) operand
    in that layout (``out`` must then be given; ``current`` float, not an accumulator).

    ``weight_t`` (K, W), int8 or int16 in {-1, 0, 1}: ``current`` is a binary/ternary layer's
    input spikes (t, R, K) in ``mem``'s dtype, and the neuron takes that layer's currents, summed
    from the firing inputs as :func:`accumulate` sums them and never written to memory: ``(x @
    weight_t)·scale + bias``, rounded as PyTorch's ``mul`` and ``add_``, or with ``table``
    (2K + 1, W) in ``mem``'s dtype, ``table[x @ weight_t + K, j]`` at column j (a function of
    those currents tabulated for every possible integer sum: :func:`product_table`). The input
    spikes may be given as bits: an int64 (t, R, ``words(K)``) tensor as ``out_bits`` writes.

    ``out_bits`` (t, R, ``words(W)``) int64, last axis contiguous: the spikes are also written as
    bits, row by row (bit j %% 64 of word j // 64 is column j), the operand of a later
    :func:`accumulate` or summed scan at 1/32 of float32's bytes; with ``float_out=False`` and no
    ``out_bf16`` only the bits are written (and returned).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled scan is unavailable (see native.available())")
    R, W = mem.shape if mem.dim() == 2 else (-1, -1)
    T = current.shape[0]
    spikes, K = None, 0
    if weight_t is not None:
        spikes, current, K, weight_t = _summed_input(current, mem, weight_t, scale, table, in_layout)
    elif table is not None:
        raise ValueError("a table goes with weight_t")
    if in_layout is not None:
        _check_layout("current", current, in_layout, T, R, W)
        current = current.view(T, R, W)  # only for the checks below: the kernel uses in_layout
    if out_layout is not None:
        if out is None and (float_out or out_bf16 is None):
            raise ValueError("out_layout needs out to write into (or out_bf16 with float_out=False)")
        layout_out = out if out is not None else out_bf16
        _check_layout("out", layout_out, out_layout, T, R, W)
        shaped = [None if x is None else x.view(T, R, W) for x in (out, out_bf16)]
        originals = (out, out_bf16)
        out, out_bf16 = shaped
    if current.dim() != 3:
        raise ValueError("current must be a (t, R, W) tensor")
    T, R, W = current.shape
    fused = current.dtype == torch.bfloat16  # a bf16 accumulator
    if scale is not None and in_layout is not None:
        raise ValueError("an accumulator is read row-major only (no in_layout)")
    dtype = mem.dtype if fused else current.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the compiled scan runs float32 or float64 (or a bf16 accumulator with a scale), not {dtype}")
    if (fused and scale is None) or (bias is not None and scale is None):
        raise ValueError("a bf16 accumulator needs its scale (and a bias goes with a scale)")
    _check_columns(dtype, W, scale=scale, bias=bias)
    if not float_out and (out is not None or (out_bf16 is None and out_bits is None)):
        raise ValueError("float_out=False writes out_bf16 or out_bits only: pass one of them and no out")
    if out_bits is not None and (out_bits.dtype != torch.int64 or out_bits.shape != (T, R, words(W))
                                 or out_bits.device.type != "cpu" or (out_bits.shape[2] > 1 and out_bits.stride(2) != 1)):
        raise ValueError(f"out_bits must be a CPU int64 (t, R, {words(W)}) tensor with a contiguous last axis")
    if out is None and float_out:
        out = torch.empty((T, R, W), dtype=dtype)
    for name, t, want in (("current", None if spikes is not None else current, torch.bfloat16 if fused else dtype),
                          ("out", out, dtype),
                          ("out_bf16", out_bf16, torch.bfloat16)):
        if t is not None and (t.device.type != "cpu" or t.dtype != want or t.shape != (T, R, W)
                              or (W > 1 and t.stride(2) != 1)):
            raise ValueError(f"{name} must be a CPU {want} (t, R, W) tensor with a contiguous last axis")
    if out is not None and out_bf16 is not None and out_bf16.stride() != out.stride():
        raise ValueError("out_bf16 must have out's strides")
    for name, t in (("out", out), ("out_bf16", out_bf16)):  # no two (step, row) share memory
        if t is not None and ((R > 1 and t.stride(1) < W) or (T > 1 and t.stride(0) < R * W)):
            raise ValueError(f"{name}'s rows must not overlap")
    for name, t in (("mem", mem), ("weighted", weighted)):
        if t is not None and (t.dtype != dtype or t.shape != (R, W) or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"{name} must be a contiguous {dtype} (R, W) CPU tensor")
    if counts is not None and (counts.dtype != torch.int64 or counts.shape != (T,) or not counts.is_contiguous()
                               or counts.device.type != "cpu"):
        raise ValueError("counts must be a contiguous int64 (t,) CPU tensor")
    if valid is not None:
        valid = valid.reshape(R).to(torch.uint8).contiguous()
    fn = lib.scan_f32 if dtype == torch.float32 else lib.scan_f64
    threads = max(1, min(torch.get_num_threads(), R, (T * R * W) // MIN_SPLIT))
    ol = out if out is not None else out_bf16
    li = in_layout or Layout(current.stride(0), R, R * current.stride(1), current.stride(1), None)
    lo = out_layout or (Layout(ol.stride(0), R, R * ol.stride(1), ol.stride(1), None) if ol is not None
                        else Layout(R * W, R, R * W, W, None))  # bits only: no float or bf16 spikes
    summed = spikes is not None
    bits_in = summed and spikes.dtype == torch.int64
    failed = fn(None if fused or summed else current.data_ptr(), current.data_ptr() if fused else None,
                None if table is not None else _ptr(scale), None if table is not None else _ptr(bias),
                li.ts, li.rs, li.lseq, li.bs, _ptr(li.cols),
                None if bits_in else _ptr(spikes), _ptr(spikes) if bits_in else None,
                spikes.stride(0) if summed else 0, spikes.stride(1) if summed else 0,
                _ptr(weight_t), K, _ptr(table),
                _ptr(out), _ptr(out_bf16), _ptr(out_bits), 0 if out_bits is None else out_bits.stride(0),
                0 if out_bits is None else out_bits.stride(1), lo.ts, lo.rs, lo.lseq, lo.bs, _ptr(lo.cols),
                mem.data_ptr(), _ptr(weighted), _ptr(valid), _ptr(counts),
                T, R, W, float(threshold), float(leak), threads)
    if failed:
        raise MemoryError("the compiled scan could not allocate its step counts or work buffer")
    if out_layout is not None:
        out, out_bf16 = originals
    return out if float_out else out_bf16 if out_bf16 is not None else out_bits


def _rows(name: str, t: Tensor | None, want: torch.dtype, shape) -> Tensor | None:
    """``t`` (a CPU ``want`` tensor of ``shape`` whose last axis is contiguous) as (rows, W) with one
    row stride, or None for None."""
    if t is None:
        return None
    W = shape[-1]
    if t.dtype != want or t.device.type != "cpu" or tuple(t.shape) != tuple(shape) or (W > 1 and t.stride(-1) != 1):
        raise ValueError(f"{name} must be a CPU {want} tensor of shape {tuple(shape)} with a contiguous last axis")
    try:
        return t.view(-1, W)
    except RuntimeError:
        raise ValueError(f"{name}'s rows must merge into one stride") from None


def affine(acc: Tensor, scale: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
           out: Tensor | None = None, out_layout: Layout | None = None) -> Tensor:
    """``(acc·scale + bias) + residual`` in ``scale``'s dtype (float32 or float64), in one pass.

    ``acc`` (..., W): a product accumulator of exact integers, bf16 or in ``scale``'s dtype;
    ``residual``: 0/1 spikes of the same shape, bf16 or in ``scale``'s dtype, or None. Each operation is rounded as
    PyTorch's ``mul``, ``add_`` and ``add_`` in that order would round it, so the result equals
    theirs bit for bit. Any
    leading-axes layout whose rows merge into one stride (a column slice of a contiguous tensor)
    is accepted; ``out`` is allocated contiguous when None. ``out_layout`` (:func:`head_layout`,
    whose ``lseq`` divides the rows): ``out``, a contiguous tensor of another shape, holds the
    result in that layout.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled kernels are unavailable (see native.available())")
    dtype, W = scale.dtype, acc.shape[-1]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"affine runs float32 or float64, not {dtype}")
    if out_layout is not None:
        if out is None or out.dtype != dtype:
            raise ValueError(f"out_layout needs out, a {dtype} tensor to write into")
        rows_all = acc.numel() // max(W, 1)
        _check_layout("out", out, out_layout, None, rows_all, W)
    elif out is None:
        out = torch.empty(acc.shape, dtype=dtype)

    low = acc.dtype == torch.bfloat16
    res_low = residual is not None and residual.dtype == torch.bfloat16
    a = _rows("acc", acc, torch.bfloat16 if low else dtype, acc.shape)
    r = _rows("residual", residual, torch.bfloat16 if res_low else dtype, acc.shape)
    o = _rows("out", out, dtype, acc.shape) if out_layout is None else out
    _check_columns(dtype, W, scale=scale, bias=bias)
    R = a.shape[0]
    threads = max(1, min(torch.get_num_threads(), R, (R * W) // MIN_SPLIT))
    fn = lib.affine_f32 if dtype == torch.float32 else lib.affine_f64
    lo = out_layout or Layout(0, R, R * o.stride(0), o.stride(0), None)
    fn(a.data_ptr() if low else None, None if low else a.data_ptr(), a.stride(0), scale.data_ptr(), _ptr(bias),
       _ptr(r) if res_low else None, None if res_low else _ptr(r), 0 if r is None else r.stride(0),
       o.data_ptr(), lo.rs, lo.lseq, lo.bs, _ptr(lo.cols), R, W, threads)
    return out



def accumulate(x: Tensor, weight_t: Tensor, out: Tensor | None = None, scale: Tensor | None = None,
               bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """``x @ weight_t`` for 0/1 spikes ``x`` (..., K) in float32 or float64 and integer weights
    ``weight_t`` (K, N), int8 or int16 in {-1, 0, 1} (int16 saves a conversion per call): the accumulate-only product of a binary/ternary layer,
    event-driven (each row adds the weight rows of its firing inputs; a neuromorphic chip's
    synaptic operations). Integer sums, exact, so the result equals ``x @ weight_t.to(x.dtype)``
    bit for bit; faster than a dense float product where spikes are sparse and on CPUs without
    fast bf16 products. With ``scale`` (N,) (and ``bias`` (N,), ``residual`` (..., N), all in x's
    dtype) it returns :func:`affine` of that product, ``((x @ W)·scale + bias) + residual`` with
    the same roundings, without writing the product first. ``out``: a contiguous (..., N) tensor
    of x's dtype to write into.

    ``x`` may be the spikes as bits, an int64 (..., ``words(K)``) tensor as :func:`scan`'s
    ``out_bits`` writes them; the result then has the dtype of ``scale`` (or of ``out``, else
    float32)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled kernels are unavailable (see native.available())")
    bits = x.dtype == torch.int64
    if bits:
        K = weight_t.shape[0] if weight_t.dim() == 2 else -1
        dtype = scale.dtype if scale is not None else out.dtype if out is not None else torch.float32
        if x.device.type != "cpu" or x.dim() < 1 or x.shape[-1] != words(K):
            raise ValueError(f"{K} input spikes as bits take {words(K)} int64 words a row, got {tuple(x.shape)}")
    else:
        dtype, K = x.dtype, x.shape[-1]
    if dtype not in (torch.float32, torch.float64) or x.device.type != "cpu":
        raise ValueError(f"accumulate runs CPU float32 or float64 spikes, not {x.device.type} {dtype}")
    if weight_t.dtype not in (torch.int8, torch.int16) or weight_t.dim() != 2 or weight_t.shape[0] != K \
            or not weight_t.is_contiguous():
        raise ValueError(f"weight_t must be a contiguous int8 or int16 ({K}, N) matrix, got {weight_t.dtype} "
                         f"{tuple(weight_t.shape)}")
    if not 0 < K <= ACCUMULATE_MAX_K:
        raise ValueError(f"accumulate sums 1 to {ACCUMULATE_MAX_K} inputs exactly, got {K}")
    N = weight_t.shape[1]
    if (bias is not None or residual is not None) and scale is None:
        raise ValueError("a bias or residual goes with a scale")
    _check_columns(dtype, N, scale=scale, bias=bias)
    width = x.shape[-1]  # K, or K's words
    if width > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    try:
        rows = x.view(-1, width)
    except RuntimeError:
        rows = x.reshape(-1, width)
    shape = (*x.shape[:-1], N)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}")
    res = _rows("residual", residual, dtype, shape)
    R = rows.shape[0]
    if R == 0 or N == 0:
        return out
    threads = max(1, min(torch.get_num_threads(), R, (R * max(K, N)) // MIN_SPLIT))
    if weight_t.dtype == torch.int8:
        weight_t = weight_t.to(torch.int16)  # the kernel adds int16 rows (no widening per event)
    fn = lib.accumulate_f32 if dtype == torch.float32 else lib.accumulate_f64
    if fn(None if bits else rows.data_ptr(), rows.data_ptr() if bits else None, rows.stride(0), weight_t.data_ptr(),
          out.data_ptr(), N, _ptr(scale), _ptr(bias), _ptr(res), 0 if res is None else res.stride(0), R, K, N, threads):
        raise MemoryError("the compiled accumulation could not allocate its work buffer")
    return out
