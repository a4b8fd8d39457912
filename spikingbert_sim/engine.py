"""The multi-step engine: each layer runs over all T steps (or a chunk of them) at once.

A layer's input currents for every step are one matrix product over t·B·L rows, then the neuron
recurrence runs as a scan over t, and the spikes go to the next layer. This is exact because the
network is feed-forward inside a time step (SPEC §3): a layer's inputs for all steps are known
before it runs. Two backends compute it:

* ``torch`` (any device; the only one on CPU): the model's own operations on (t, B, L, W) tensors,
  bit for bit the reference engine's result in float64 and float32 (``tests/test_simulation.py``).
  Binary/ternary products are exact integer sums, run as bf16 products where the CPU has bf16
  instructions (:func:`kernels.exact_product_cpu`) and else as the compiled event-driven
  accumulation (:func:`native.accumulate`; :func:`kernels.cpu_spike_product` chooses), K and V
  share one product, and scales, biases, GELU and residuals are applied in place. On the CPU each
  site's neuron runs over the chunk's steps in one compiled pass (:mod:`native`, where a C
  compiler is at hand; else ``kernels.scan_torch``, three in-place operations a step), which also
  counts the recorder's statistics and writes the spikes that the next product reads; the
  compiled code also applies the binary/ternary products' scale, bias and residual
  (:func:`native.affine`, or inside the key and value neurons' scan), and writes attention's
  operands per head so that its products need no re-layout copies. With the compiled
  accumulation, the key, value and intermediate neurons sum their own binary/ternary currents
  from the input spikes as they run (:func:`native.scan`'s ``weight_t``; the intermediate GELU
  read from a table of its value at every possible integer sum), so those currents are never
  written to memory. The products and tables are prepared once per model and kept until a
  weight changes.
* ``fused`` (CUDA): spike products on tensor cores in fp8 e4m3 or int8 (exact for binary/ternary
  weights), then one Triton kernel per site that applies the product's scale and bias (and GELU,
  or the residual and LayerNorm), runs the neuron over t with the membrane in registers, writes
  one-byte spikes and accumulates the recording statistics; attention through
  ``scaled_dot_product_attention`` in bf16 (or the model's fp32 attention). Not bitwise equal to
  the reference: see ``benchmarks/README.md`` for the measured spike mismatch.

Memory: when t·B·L rows of a layer's tensors would not fit, the T steps are cut into consecutive
chunks (:func:`plan_chunks`); every site carries its membrane from one chunk to the next, so a
chunked simulation equals an unchunked one exactly.
"""

from __future__ import annotations

import itertools
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, native
from .errors import ConfigError
from .model import INPUT_SITE, SpikingBertForSequenceClassification, SpikingEncoderLayer
from .neurons import initial_membrane
from .quantization import QuantLinear

BACKENDS = ("auto", "torch", "fused")
CPU_CHUNK_BYTES = 128 << 20
"""Working-set target of one time chunk on the CPU (the torch backend's estimate). Measured on
2 cores (Intel Xeon, 2026-12-06): at the benchmark's tiny size 2 chunks of 40 steps run 10-15 %
faster than 7 of 12 (the 32 MB this was before), the shipped SST-2 model at batch 8 × 24 tokens 35 %
faster, at batch 32 × 40 the same."""
ATTENTION = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class EngineOptions:
    """How the multi-step engine runs.

    backend: ``auto`` (``fused`` on CUDA when Triton imports, else ``torch``), ``torch``, ``fused``.
    operand: spike-product format of the fused backend, ``auto`` (fp8 for binary/ternary weights,
        bf16 for full precision) or one of :data:`kernels.OPERANDS`.
    attention: fused backend's attention, ``auto``/``bf16`` (fused SDPA kernel) or ``fp32``
        (the model's own attention, closest to the reference).
    chunk_steps: time steps per chunk; None plans them from free memory.
    memory_fraction: share of free memory the chunk planner may fill.
    """

    backend: str = "auto"
    operand: str = "auto"
    attention: str = "auto"
    chunk_steps: int | None = None
    memory_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.operand != "auto" and self.operand not in kernels.OPERANDS:
            raise ConfigError(f"operand must be auto or one of {', '.join(kernels.OPERANDS)}, got {self.operand!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.chunk_steps is not None and (isinstance(self.chunk_steps, bool) or self.chunk_steps <= 0):
            raise ConfigError(f"chunk_steps must be a positive integer, got {self.chunk_steps!r}")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")


def resolve_backend(options: EngineOptions, device: torch.device) -> str:
    if options.backend != "auto":
        if options.backend == "fused" and device.type != "cuda" and not kernels._interpreting():
            raise ConfigError("the fused backend needs a CUDA device")
        return options.backend
    return "fused" if device.type == "cuda" and kernels.triton_available() else "torch"


def resolve_operand(options: EngineOptions, weight_mode: str) -> str:
    if options.operand != "auto":
        return options.operand
    return "bf16" if weight_mode == "fp" else "fp8"


# ---------------------------------------------------------------------------------------------
# Memory: chunks over time
# ---------------------------------------------------------------------------------------------

def bytes_per_row_step(model: SpikingBertForSequenceClassification, backend: str, dtype: torch.dtype) -> int:
    """Peak bytes one token row needs for one time step while a layer runs (a generous estimate:
    every intermediate of the layer counted as alive at once)."""
    cfg = model.config
    D, I = cfg.hidden_size, cfg.intermediate_size
    if backend == "fused":
        # x, q/k/v accumulators (fp32 at worst), q, k, v, context, a, o-acc, so, i-acc, h, 2-acc, out
        return D * (1 + 12 + 2 + 4 + 4 + 1 + 4 + 1 + 4 + 1) + I * (4 + 1)
    item = torch.finfo(dtype).bits // 8
    # currents, spikes and products of each site, plus the bf16 copies of the exact products
    return item * (14 * D + 4 * I) + 2 * (4 * D + 2 * I)


def attention_bytes_per_row_step(model: SpikingBertForSequenceClassification, seq_len: int,
                                 backend: str, attention: str, dtype: torch.dtype) -> int:
    """Bytes of materialized attention scores and probabilities per token row and step."""
    if backend == "fused" and attention == "bf16":
        return 0
    item = torch.finfo(dtype).bits // 8 if backend == "torch" else 4
    return 3 * model.config.num_attention_heads * seq_len * item


def free_memory(device: torch.device) -> int:
    """Bytes that may be allocated on ``device`` now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def plan_chunks(timesteps: int, rows: int, bytes_per_row: int, budget: int,
                chunk_steps: int | None = None) -> list[tuple[int, int]]:
    """Cut T steps into consecutive ``(t0, t1)`` chunks of equal length (the last may be shorter)
    whose t·rows·bytes_per_row fits in ``budget`` bytes; at least one step a chunk."""
    if chunk_steps is None:
        fit = max(1, min(timesteps, budget // max(1, rows * bytes_per_row)))
        # as many chunks as needed, of equal length (e.g. 40 + 40, not 55 + 25), so that every
        # chunk reuses the same cached allocations
        chunk_steps = -(-timesteps // -(-timesteps // fit))
    chunk_steps = min(chunk_steps, timesteps)
    return [(t0, min(t0 + chunk_steps, timesteps)) for t0 in range(0, timesteps, chunk_steps)]


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def run_multistep(model: SpikingBertForSequenceClassification, embedded: Tensor, mask_bias: Tensor,
                  timesteps: int, recorder, options: EngineOptions | None = None) -> list[tuple[int, int]]:
    """Simulate ``timesteps`` steps layer by layer, handing every site's spikes (or their
    statistics) to ``recorder`` (a :class:`~spikingbert_sim.simulation.Recorder`; if it has an
    ``on_spikes(site, t0, spikes (t, B, L, W))`` method, every block of spikes goes there too).
    Returns the time chunks it ran."""
    options = options or EngineOptions()
    if model.feedback is not None:
        raise ConfigError("the multi-step engine cannot run a model with a feedback connection; "
                          "use engine='reference'")
    backend = resolve_backend(options, embedded.device)
    B, L, _ = embedded.shape
    attention = "bf16" if options.attention == "auto" else options.attention
    per_row = bytes_per_row_step(model, backend, embedded.dtype) + attention_bytes_per_row_step(
        model, L, backend, attention, embedded.dtype)
    budget = int(free_memory(embedded.device) * options.memory_fraction)
    if embedded.device.type == "cpu":
        # a bounded chunk: fewer page faults on fresh allocations and more cache reuse between a
        # layer's operations than all T at once, few enough chunks that per-operator costs stay small
        budget = min(budget, CPU_CHUNK_BYTES)
    chunk_steps = options.chunk_steps
    adaptive = getattr(recorder, "adaptive", None)
    if adaptive is not None:  # an adaptive run checks whether to stop after every chunk
        planned = plan_chunks(timesteps, B * L, per_row, budget, chunk_steps)[0]
        chunk_steps = min(planned[1] - planned[0], adaptive.check_every)
    chunks = plan_chunks(timesteps, B * L, per_row, budget, chunk_steps)
    if embedded.device.type == "cpu":
        native.tune_malloc()
    if backend == "torch":
        _TorchRun(model, embedded, mask_bias, timesteps, recorder).run(chunks)
    else:
        _FusedRun(model, embedded, mask_bias, timesteps, recorder,
                  resolve_operand(options, model.config.weight_mode), attention).run(chunks)
    return chunks


# ---------------------------------------------------------------------------------------------
# torch backend: the model's operations over (t, B, L, W), bitwise the reference
# ---------------------------------------------------------------------------------------------

class _ExactLinear:
    """Several QuantLinear layers on one input as one product: ``[(x @ Vᵢᵀ)·sᵢ + bᵢ]``.

    Binary/ternary: the integer product is exact in any order (bf16 slices on CPU, the model's
    dtype on other devices), and the scale and bias follow in QuantLinear's order, so every current
    equals the reference's bit for bit. Full precision: each module's own forward.
    """

    def __init__(self, modules: list[QuantLinear], dtype: torch.dtype, device: torch.device) -> None:
        self.modules = modules
        self.exact = modules[0].mode != "fp"
        if not self.exact:
            return
        values, scales = zip(*(m.quantized() for m in modules))
        self.cpu = device.type == "cpu"
        # the exact product the CPU runs fastest (kernels.cpu_spike_product); the model's dtype elsewhere
        how = kernels.cpu_spike_product() if self.cpu else "float"
        self.low = how == "bf16"
        self.values = torch.cat(values).to(device=device, dtype=torch.bfloat16 if self.low else dtype)
        self.wt = None  # (K, N) int16 weights for native.accumulate
        if how == "accumulate" and dtype in (torch.float32, torch.float64) and native.available() \
                and self.values.shape[1] <= native.ACCUMULATE_MAX_K:
            self.wt = self.values.to(torch.int16).t().contiguous()
        self.splits = [m.out_features for m in modules]
        self.biases = [m.bias for m in modules]
        # every column's scale (and bias) as one row: one multiply (and one add) for all modules
        self.scale_row = torch.cat([s.to(device=device, dtype=dtype).expand(n) for s, n in zip(scales, self.splits)])
        self.bias_row = None if any(b is None for b in self.biases) else \
            torch.cat([b.detach().to(device=device, dtype=dtype) for b in self.biases])
        # the compiled CPU kernels apply scale, bias (and a residual) to a bf16 accumulator in one
        # pass, or inside the neuron scan, with the same roundings
        self.dtype = dtype
        self.native = self.cpu and dtype in (torch.float32, torch.float64) and native.available() \
            and (self.bias_row is not None or all(b is None for b in self.biases))

    def summed(self, c0: int, c1: int, fn=None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None:
        """Columns c0..c1-1 for a neuron scan that sums the product itself (:func:`native.scan`'s
        ``weight_t``): their int16 weights, scale, bias and, with ``fn``, the table of
        ``fn(currents)`` for every possible sum; None where the compiled accumulation is not used."""
        if self.wt is None or not self.native:
            return None
        bias = None if self.bias_row is None else self.bias_row[c0:c1].contiguous()
        scale = self.scale_row[c0:c1].contiguous()
        table = None if fn is None else native.product_table(fn, scale, bias, self.wt.shape[0])
        return self.wt[:, c0:c1].contiguous(), scale, bias, table

    def product(self, x: Tensor, low: Tensor | None = None) -> Tensor:
        """``x @ valuesᵀ``, exact; ``low``: the same 0/1 spikes already in bf16 (saves a
        conversion). With bf16 products the result may be bf16 (exact integers)."""
        if self.low:
            return kernels.exact_product_cpu(x, self.values, low, keep_bf16=True, acc_dtype=self.dtype)
        if self.wt is not None and x.dtype == self.dtype:
            return native.accumulate(x, self.wt)
        return F.linear(x, self.values)

    def currents(self, x: Tensor, low: Tensor | None = None, residual: Tensor | None = None,
                 acc: Tensor | None = None, cols: slice = slice(None), out: Tensor | None = None,
                 out_layout: native.Layout | None = None) -> Tensor:
        """Binary/ternary: every module's current side by side, (..., Σ out_features), with
        QuantLinear's roundings: ``(x @ Vᵀ)·s``, then ``+ b``; then ``+ residual`` if given (as
        the reference adds a residual to one module's output). ``acc``: the product, if the
        caller has it; ``cols``: only these columns of it. ``out``, ``out_layout``: write the
        result there, in that layout (:func:`native.affine`; only where :meth:`fusable` holds)."""
        if acc is None and self.wt is not None and self.native and x.dtype in (self.dtype, torch.int64) and out is None \
                and out_layout is None and cols == slice(None) and (residual is None or residual.dtype == self.dtype):
            # the compiled accumulation applies scale, bias and residual as it writes: one pass
            return native.accumulate(x, self.wt, scale=self.scale_row, bias=self.bias_row, residual=residual)
        acc = self.product(x, low) if acc is None else acc
        if self.fusable(acc) and (residual is None or residual.dtype in (torch.bfloat16, self.dtype)):
            # one pass, the same roundings
            return native.affine(acc[..., cols], self.scale_row[cols],
                                 None if self.bias_row is None else self.bias_row[cols], residual,
                                 out=out, out_layout=out_layout)
        if out is not None or out_layout is not None:
            raise ValueError("an output tensor or layout needs the compiled affine pass")
        # a bf16 accumulator is converted to x's dtype (exactly: small integers) in the multiply
        out = torch.mul(acc, self.scale_row)
        if self.bias_row is not None:
            out.add_(self.bias_row)
        else:
            for part, b in zip(out.split(self.splits, dim=-1), self.biases):
                if b is not None:
                    part.add_(b)
        out = out[..., cols]
        return out if residual is None else out.add_(residual)

    def fusable(self, acc: Tensor | None) -> bool:
        """Whether the compiled kernels can apply scale and bias to this accumulator (a CPU
        product, bf16 or summed from bf16 slices in the model's dtype, with the compiled kernels
        available)."""
        return self.exact and self.native and acc is not None and acc.dtype in (torch.bfloat16, self.dtype)

    def __call__(self, x: Tensor, low: Tensor | None = None, residual: Tensor | None = None) -> list[Tensor]:
        if not self.exact:
            outs = [m(x) for m in self.modules]
            return outs if residual is None else [o.add_(residual) for o in outs]
        return list(self.currents(x, low, residual).split(self.splits, dim=-1))

    def fused_pair(self, x: Tensor, first: int, count: int = 2, low: Tensor | None = None,
                   acc: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Currents of modules ``first..first+count-1`` side by side, (..., Σ widths) (a view of
        the accumulator, no copy), plus the others' currents."""
        if not self.exact:
            outs = [m(x) for m in self.modules]
            return torch.cat(outs[first:first + count], -1), outs[:first] + outs[first + count:]
        acc = self.currents(x, low, acc=acc)
        parts = list(acc.split(self.splits, dim=-1))
        c0 = sum(self.splits[:first])
        pair = acc[..., c0:c0 + sum(self.splits[first:first + count])]
        return pair, parts[:first] + parts[first + count:]


_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    """Identity and version of every parameter and buffer: changes when any weight changes."""
    return tuple((t.data_ptr(), t._version, t.dtype, str(t.device))
                 for t in itertools.chain(model.parameters(), model.buffers()))


def _cached(model: nn.Module, key: tuple, build: Callable[[], list[dict]]) -> list[dict]:
    """``build()``'s result for this model and ``key``, kept until a parameter or buffer of the
    model changes (:func:`_signature`)."""
    sig = _signature(model)
    cache = _PREPARED.setdefault(model, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    value = build()
    cache[key] = (sig, value)
    return value


def _torch_linears(model: SpikingBertForSequenceClassification, dtype: torch.dtype, device: torch.device,
                   compiled: bool) -> list[dict]:
    """The torch backend's per-layer products (:class:`_ExactLinear`), cached per model, dtype,
    device and CPU product until a parameter or buffer of the model changes. With the compiled
    kernels and binary/ternary weights, ``summed``: the operands with which K's, V's and the
    intermediate neurons sum their own currents (:meth:`_ExactLinear.summed`; the intermediate
    layer's GELU tabulated), and Q's."""
    D = model.config.hidden_size

    def build() -> list[dict]:
        linears = []
        for layer in model.layers:
            lin = dict(kvq=_ExactLinear([layer.key, layer.value, layer.query], dtype, device),
                       o=_ExactLinear([layer.attention_output], dtype, device),
                       i=_ExactLinear([layer.intermediate], dtype, device),
                       out=_ExactLinear([layer.output], dtype, device))
            kvq, inter = lin["kvq"], lin["i"]
            parts = [kvq.summed(0, D), kvq.summed(D, 2 * D), kvq.summed(2 * D, 3 * D),
                     inter.summed(0, inter.splits[0], F.gelu)] if compiled and kvq.exact else [None]
            lin["summed"] = None if any(p is None for p in parts) else parts
            linears.append(lin)
        return linears

    key = ("torch", dtype, str(device), compiled, kernels.cpu_spike_product() if device.type == "cpu" else None)
    return _cached(model, key, build)


class _TorchRun:
    def __init__(self, model, embedded: Tensor, mask_bias: Tensor, timesteps: int, recorder) -> None:
        self.model, self.embedded, self.mask_bias, self.recorder = model, embedded, mask_bias, recorder
        cfg = model.config
        self.threshold, self.leak, self.initial_membrane = cfg.threshold, cfg.leak, cfg.initial_membrane
        self.output_site = model.output_site
        self.mems: dict[str, Tensor] = {}
        dt, dev = embedded.dtype, embedded.device
        self.dtype = dt
        # The compiled scan (CPU, float32/64): per-site state, statistics counted in the scan,
        # and bf16 copies of the spikes for the exact products that read them.
        self.native = dev.type == "cpu" and dt in (torch.float32, torch.float64) and native.available()
        self.linears = _torch_linears(model, dt, dev, self.native)
        # binary/ternary weights with the compiled accumulation: the exact products read spikes as bits
        self.packs = self.native and all(lin["summed"] is not None for lin in self.linears)
        self.bf16 = self.native and model.config.weight_mode != "fp" and kernels.cpu_spike_product() == "bf16"
        B, L, _ = embedded.shape
        self.B, self.L, self.R = B, L, B * L
        opts = recorder.options
        full = set(recorder.per_neuron_sites) if opts.per_neuron else set()
        if self.native:
            # attention's operands per head: Q and V (t, B, H, L, dh), Kᵀ (t, B, H, dh, L), and the
            # context read back in V's layout, so the per-head products need no re-layout copies
            H, dh = cfg.num_attention_heads, cfg.head_dim
            self.heads = (B, L, H, dh)
            self.lay_heads = native.head_layout(B, L, H, dh)
            self.lay_kt = native.head_layout(B, L, H, dh, transposed=True)
            self.valid = None if recorder.all_valid else recorder.mask.reshape(-1)
            self.state = {s: kernels.ScanState(self.R, model.site_width(s), timesteps, dev, dt,
                                               stats=s not in full, counts_dtype=torch.int64,
                                               initial=cfg.initial_membrane * cfg.threshold)
                          for s in model.site_names()}
        self.done = 0

    def scan(self, sites: tuple[str, ...], current: Tensor, operand: bool = False,
             affine: tuple[Tensor, Tensor | None] | None = None, in_layout: native.Layout | None = None,
             head_outs: tuple[tuple[Tensor, native.Layout, Callable[[], Tensor]], ...] | None = None,
             summed: tuple | None = None, floats: bool = True):
        """Scan ``current`` (t, B, L, ΣW) for one or more sites laid side by side.

        ``summed`` (one site; compiled scan only): ``current`` is a binary/ternary layer's input
        spikes, and this (weights, scale, bias, table) of :meth:`_ExactLinear.summed` gives the
        site's currents, summed inside the scan.

        Compiled scan only: ``affine``: ``current`` is a bf16 product accumulator and this
        (scale, bias) turns it into currents inside the scan; ``in_layout``: ``current`` is a
        contiguous tensor holding them in that layout (:func:`native.head_layout`); ``head_outs``:
        per site, the tensor and layout its float spikes go to, and a function giving them as
        (t, B, L, W) for the recorder (called only when a record needs them). Returns None for
        the spikes with ``head_outs``.

        ``operand``: the spikes feed exact binary/ternary products (and residual sums); with the
        compiled scan they are then also written in the form those products read: bf16 where the
        products run in bf16, written alone (0 and 1 are exact in bf16, and a float tensor plus bf16
        spikes rounds as plus float spikes), or bits (int64 (t, B, L, ``native.words(W)``)) for the
        compiled accumulation and the neurons that sum their own currents. ``floats=False``: with
        bits, the float spikes are not needed (only products read the spikes) and are written only
        where the recorder reads them; the bits then stand for the spikes too.
        Returns the spikes, or (spikes, their operand form or None) when ``operand`` is asked for."""
        packed = None
        if self.native:
            bits = operand and self.packs
            floats = floats or not bits or self._recorded(sites[0])
            spikes, low, packed = self._scan_native(sites, current, operand and self.bf16, affine, in_layout,
                                                    head_outs, summed, bits, floats)
        else:
            key = "+".join(sites)
            if key not in self.mems:
                self.mems[key] = initial_membrane(current[0], self.threshold, self.initial_membrane)
            spikes, self.mems[key] = kernels.scan_torch(current, self.threshold, self.leak, self.mems[key])
            low = None
        rec = self.recorder
        hook = getattr(rec, "on_spikes", None)
        c0 = 0
        for n, s in enumerate(sites):
            w = self.model.site_width(s)
            counted = self.native and self.state[s].counts is not None
            readout = s == self.output_site and rec.track_readout
            if self._recorded(s):
                if head_outs is not None:
                    part = head_outs[n][2]()
                else:
                    part = spikes if len(sites) == 1 else spikes[..., c0:c0 + w]
                if not counted:
                    rec.block(s, part.to(self.dtype))  # statistics (and per-neuron traces) from the spikes
                else:  # statistics were counted in the scan: only rasters and the readout remain
                    rec.raster(s, part)
                    if readout:
                        rec.readout_block(part)
                if hook is not None:
                    hook(s, self.t0, part.to(self.dtype))
            c0 += w
        if packed is not None:
            low = packed
            if spikes is None:
                spikes = packed
        return (spikes, low) if operand else spikes

    def _recorded(self, site: str) -> bool:
        """Whether the recorder reads this site's spikes (statistics not counted in the compiled
        scan, a spike hook, rasters or the readout), not only the scan's counts."""
        rec = self.recorder
        return not (self.native and self.state[site].counts is not None) or getattr(rec, "on_spikes", None) is not None \
            or (site == self.output_site and rec.track_readout) or site in rec.options.raster_sites

    def _scan_native(self, sites: tuple[str, ...], current: Tensor, bf16: bool,
                     affine: tuple[Tensor, Tensor | None] | None, in_layout: native.Layout | None,
                     head_outs, summed=None, bits: bool = False,
                     floats: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        t = current.shape[0]
        width = sum(self.model.site_width(s) for s in sites)
        if summed is not None:
            cur = current.reshape(t, self.R, -1)  # the input spikes
            weight_t, scale, bias, table = summed
            summed = dict(weight_t=weight_t, table=table)
            affine = None if table is not None else (scale, bias)
        elif in_layout is not None:
            cur = current  # the kernel reads it through in_layout
        elif current.stride(0):
            cur = current.reshape(t, self.R, width)
        else:
            cur = current[:1].reshape(1, self.R, width).expand(t, -1, -1)
        shape = (t, self.R, width)
        # bf16 alone where only products and residual sums read the spikes; bits alone where
        # only a compiled accumulation reads them
        out = None if bf16 or head_outs is not None or not floats else torch.empty(shape, dtype=self.dtype)
        low = torch.empty(shape, dtype=torch.bfloat16) if bf16 else None
        packed = torch.empty(t, self.R, native.words(width), dtype=torch.int64) if bits else None
        c0 = 0
        for n, s in enumerate(sites):
            w = self.model.site_width(s)
            st = self.state[s]
            cols = slice(c0, c0 + w)
            target = dict(out=head_outs[n][0], out_layout=head_outs[n][1]) if head_outs is not None else \
                dict(out=None if out is None else out[..., cols], out_bf16=None if low is None else low[..., cols],
                     float_out=out is not None, out_bits=packed)
            native.scan(cur if in_layout is not None or summed else cur[..., cols], st.mem, threshold=self.threshold,
                        leak=self.leak, weighted=st.weighted, valid=self.valid, in_layout=in_layout,
                        counts=None if st.counts is None else st.counts[self.t0:self.t0 + t],
                        scale=None if affine is None else affine[0][cols],
                        bias=None if affine is None or affine[1] is None else affine[1][cols], **target,
                        **(summed or {}))
            c0 += w
        if head_outs is not None:
            return None, None, None
        view = (t, self.B, self.L, -1)
        packed = None if packed is None else packed.view(view)
        if low is None:
            return None if out is None else out.view(view), None, packed
        return low.view(view), low.view(view), None

    def layer(self, layer: SpikingEncoderLayer, lin: dict, x: Tensor, x16: Tensor | None) -> tuple[Tensor, Tensor | None]:
        D = self.model.config.hidden_size
        kv_sites = (layer.site("key"), layer.site("value"))
        kvq, summed = lin["kvq"], lin["summed"]
        acc = kvq.product(x, x16) if kvq.exact and summed is None else None
        mask = None if self.recorder.all_valid else self.mask_bias  # no padding: nothing to add
        if self.native:
            a, a16 = self._attention_per_head(layer, kvq, x, x16, acc, kv_sites, mask, summed)
        else:
            kv_cur, (q,) = kvq.fused_pair(x, 0, low=x16, acc=acc)
            kv = self.scan(kv_sites, kv_cur)
            k, v = kv[..., :D], kv[..., D:]
            a, a16 = self.scan((layer.site("attention"),), layer.attend(q, k, v, mask), operand=True)
        (o,) = lin["o"](a, low=a16, residual=x)
        so, so16 = self.scan((layer.site("attention_output"),), layer.attention_norm(o), operand=True)
        if summed is not None:  # the neurons sum their currents (from so's bits) and take their GELU from a table
            h, h16 = self.scan((layer.site("intermediate"),), so if so16 is None else so16, operand=True,
                               summed=summed[3], floats=False)
        else:
            (i,) = lin["i"](so, low=so16)
            h, h16 = self.scan((layer.site("intermediate"),), _gelu_(i), operand=True)
        (o2,) = lin["out"](h, low=h16, residual=so)
        return self.scan((layer.site("output"),), layer.output_norm(o2), operand=True)

    def _attention_per_head(self, layer: SpikingEncoderLayer, kvq: _ExactLinear, x: Tensor, x16: Tensor | None,
                            acc: Tensor | None, kv_sites: tuple[str, str], mask: Tensor | None, summed=None):
        """K and V spikes written per head (Kᵀ transposed), Q per head, the model's per-head
        attention on them, and the attention site's neurons reading the context per head: the
        same operands and products as :meth:`SpikingEncoderLayer.attend`, without its copies.
        ``summed``: K's and V's neurons sum their products from ``x`` themselves, and Q's
        currents are accumulated apart (:meth:`_ExactLinear.summed`)."""
        B, L, H, dh = self.heads
        D, t = H * dh, x.shape[0]
        k_t = torch.empty(t, B, H, dh, L, dtype=self.dtype)
        v = torch.empty(t, B, H, L, dh, dtype=self.dtype)
        outs = ((k_t, self.lay_kt, lambda: k_t.permute(0, 1, 4, 2, 3).reshape(t, B, L, D)),
                (v, self.lay_heads, lambda: v.permute(0, 1, 3, 2, 4).reshape(t, B, L, D)))
        if summed is not None:
            spikes = x if x16 is None else x16  # x's bits where the scan wrote them
            for site, out, part in zip(kv_sites, outs, summed):
                self.scan((site,), spikes, summed=part, head_outs=(out,))
            weight_t, scale, bias, _ = summed[2]
            q = native.accumulate(spikes, weight_t, scale=scale, bias=bias)
            q = layer._heads(q).contiguous()
        elif kvq.fusable(acc):
            # K and V: the neurons take scale and bias on the fly (no current tensor); Q: one pass
            self.scan(kv_sites, acc[..., :2 * D], affine=(kvq.scale_row, kvq.bias_row), head_outs=outs)
            q = torch.empty(t, B, H, L, dh, dtype=self.dtype)
            kvq.currents(x, acc=acc, cols=slice(2 * D, None), out=q, out_layout=self.lay_heads)
        else:
            kv_cur, (q,) = kvq.fused_pair(x, 0, low=x16, acc=acc)
            self.scan(kv_sites, kv_cur, head_outs=outs)
            q = layer._heads(q).contiguous()  # the copy the product would make
        ctx = layer.attend_heads(q, k_t, v, mask)  # (t, B, H, L, dh), contiguous
        return self.scan((layer.site("attention"),), ctx, operand=True, in_layout=self.lay_heads, floats=False)

    def run(self, chunks: list[tuple[int, int]]) -> None:
        for t0, t1 in chunks:
            self.t0 = t0
            x, x16 = self.scan((INPUT_SITE,), self.embedded.expand(t1 - t0, *self.embedded.shape), operand=True)
            for layer, lin in zip(self.model.layers, self.linears):
                x, x16 = self.layer(layer, lin, x, x16)
            self.done = t1
            if self.recorder.should_stop():
                break
        if self.native:
            for site, st in self.state.items():
                if st.counts is not None:
                    self.recorder.block_counted(site, st.counts[:self.done], st.weighted.view(self.B, self.L, -1))


def _gelu_(x: Tensor) -> Tensor:
    """GELU in place (the same kernel and result as ``F.gelu``) on a tensor no one else holds."""
    return torch.ops.aten.gelu_(x) if not x.requires_grad else F.gelu(x)


# ---------------------------------------------------------------------------------------------
# fused backend (CUDA): tensor-core spike products + Triton scans
# ---------------------------------------------------------------------------------------------

@dataclass
class _Product:
    """Weights of one spike product laid out for :func:`kernels.spike_matmul`, with its epilogue
    (per-column scale, or None for full precision, and bias), all fp32 on the device."""

    weight: Tensor  # (N, K) operand dtype
    scale: Tensor | None  # (N,)
    bias: Tensor  # (N,)
    exact: bool


def prepare_product(modules: list[QuantLinear], operand: str, device) -> _Product:
    """Stack the modules' weights along outputs for one product."""
    with torch.no_grad():
        exact = modules[0].mode != "fp"
        vals, scales, biases = [], [], []
        for m in modules:
            v, s = m.quantized()
            vals.append(v.to(device))
            # the scale stays a device tensor (no host sync); one copy per output column
            scales.append(s.detach().to(device=device, dtype=torch.float32).expand(m.out_features))
            biases.append(m.bias.detach().to(device=device, dtype=torch.float32) if m.bias is not None
                          else torch.zeros(m.out_features, device=device))
        weight = torch.cat(vals).to(dtype=kernels.operand_dtype(operand)).contiguous()
        return _Product(weight, torch.cat(scales) if exact else None, torch.cat(biases), exact)


def prepared_layers(model: SpikingBertForSequenceClassification, operand: str, device) -> list[dict]:
    """The fused backend's per-layer weights (stacked, converted to the operand format), cached
    per model, operand and device until a parameter or buffer of the model changes."""
    def norm(n):
        return (n.weight.detach().float().contiguous(), n.bias.detach().float().contiguous(), n.eps)

    def build() -> list[dict]:
        return [dict(layer=layer,
                     qkv=prepare_product([layer.query, layer.key, layer.value], operand, device),
                     o=prepare_product([layer.attention_output], operand, device),
                     i=prepare_product([layer.intermediate], operand, device),
                     out=prepare_product([layer.output], operand, device),
                     norm1=norm(layer.attention_norm), norm2=norm(layer.output_norm))
                for layer in model.layers]

    return _cached(model, (operand, str(device)), build)


class _FusedRun:
    def __init__(self, model, embedded: Tensor, mask_bias: Tensor, timesteps: int, recorder,
                 operand: str, attention: str) -> None:
        if model.config.weight_mode == "fp" and operand in ("fp8", "int8"):
            raise ConfigError(f"full-precision weights have no exact {operand} form; use bf16 or fp32")
        self.model, self.recorder, self.T = model, recorder, timesteps
        self.operand, self.attention = operand, attention
        cfg = model.config
        self.B, self.L, self.D = embedded.shape
        self.R = self.B * self.L
        self.H, self.dh = cfg.num_attention_heads, cfg.head_dim
        self.dev = embedded.device
        self.model_dtype = embedded.dtype
        self.spike_dtype = kernels.operand_dtype(operand)
        self.embedded = embedded.reshape(self.R, self.D).to(torch.float32).contiguous()
        self.mask_bias = mask_bias
        valid = recorder.mask.reshape(-1)
        self.valid = valid.to(device=self.dev, dtype=torch.float32).contiguous()
        self.all_valid = recorder.all_valid
        self.kw = dict(threshold=cfg.threshold, leak=cfg.leak, valid=self.valid)
        self.layers = prepared_layers(model, operand, self.dev)
        opts = recorder.options
        self.full_record = set(model.site_names()) & recorder.per_neuron_sites if opts.per_neuron else set()
        self.states = {s: kernels.ScanState(self.R, model.site_width(s), timesteps, self.dev,
                                            stats=s not in self.full_record,
                                            initial=cfg.initial_membrane * cfg.threshold)
                       for s in model.site_names()}

    def fire(self, site: str, current: Tensor, t0: int, t: int, out_dtype=None, **epilogue) -> Tensor:
        spikes = kernels.scan(current, self.states[site], t0=t0, timesteps=t,
                              out_dtype=out_dtype or self.spike_dtype, **epilogue, **self.kw)
        rec = self.recorder
        full = spikes.view(t, self.B, self.L, -1)
        hook = getattr(rec, "on_spikes", None)
        if hook is not None:  # a test or benchmark looking at every spike
            hook(site, t0, full)
        if site in self.full_record or site in rec.options.raster_sites:
            if site in self.full_record:
                rec.block(site, full.to(self.model_dtype))
            else:  # one-byte spikes compare by their bits (fp8 1.0 is 0x38)
                rec.raster(site, (full.view(torch.int8) != 0) if full.element_size() == 1 else full != 0)
        if site == self.model.output_site and rec.track_readout and site not in self.full_record:
            rec.readout_block(self._as_float(full))
        return spikes

    def _as_float(self, spikes: Tensor) -> Tensor:
        """Spikes of any operand format as the model's dtype (fp8 1.0 is 0x38: compare bits)."""
        nonzero = (spikes.view(torch.int8) != 0) if spikes.element_size() == 1 else spikes != 0
        return nonzero.to(self.model_dtype)

    def product(self, x: Tensor, p: _Product) -> Tensor:
        t = x.shape[0]
        acc = kernels.spike_matmul(x.reshape(t * self.R, -1), p.weight, self.operand, p.exact)
        return acc.view(t, self.R, -1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layer: SpikingEncoderLayer) -> Tensor:
        t = q.shape[0]
        if self.attention == "fp32":
            shape = (t, self.B, self.L, self.D)
            ctx = layer.attend(q.view(shape), k.view(shape), v.view(shape), self.mask_bias)
            return ctx.reshape(t, self.R, self.D)

        def heads(z):  # (t, R, D) -> (t·B, H, L, dh)
            return z.view(t * self.B, self.L, self.H, self.dh).transpose(1, 2)

        mask = None
        if not self.all_valid:
            mask = self.mask_bias.to(q.dtype).unsqueeze(0).expand(t, *self.mask_bias.shape)
            mask = mask.reshape(t * self.B, 1, 1, self.L)
        ctx = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        return ctx.transpose(1, 2).reshape(t, self.R, self.D)  # (t·B, L, H, dh) -> (t, R, D)

    def layer(self, p: dict, x: Tensor, t0: int, t: int) -> Tensor:
        layer, D = p["layer"], self.D
        qkv, o, i, out = p["qkv"], p["o"], p["i"], p["out"]
        acc = self.product(x, qkv)  # (t, R, 3D): q | k | v

        def cols(z, c0, c1):
            return None if z is None else z[c0:c1]

        att_dtype = torch.float32 if self.attention == "fp32" else torch.bfloat16
        q = kernels.scan(acc[..., :D], None, scale=cols(qkv.scale, 0, D), bias=qkv.bias[:D], out_dtype=att_dtype)
        k = self.fire(layer.site("key"), acc[..., D:2 * D], t0, t, att_dtype,
                      scale=cols(qkv.scale, D, 2 * D), bias=qkv.bias[D:2 * D])
        v = self.fire(layer.site("value"), acc[..., 2 * D:], t0, t, att_dtype,
                      scale=cols(qkv.scale, 2 * D, 3 * D), bias=qkv.bias[2 * D:])
        del acc
        a = self.fire(layer.site("attention"), self.attend(q, k, v, layer), t0, t)
        del q, k, v
        so = self.fire(layer.site("attention_output"), self.product(a, o), t0, t,
                       scale=o.scale, bias=o.bias, residual=x, norm=p["norm1"])
        h = self.fire(layer.site("intermediate"), self.product(so, i), t0, t, scale=i.scale, bias=i.bias, gelu=True)
        return self.fire(layer.site("output"), self.product(h, out), t0, t,
                         scale=out.scale, bias=out.bias, residual=so, norm=p["norm2"])

    def run(self, chunks: list[tuple[int, int]]) -> None:
        done = 0
        for t0, t1 in chunks:
            t = t1 - t0
            x = self.fire(INPUT_SITE, self.embedded, t0, t)
            for p in self.layers:
                x = self.layer(p, x, t0, t)
            done = t1
            if self.recorder.should_stop():
                break
        for site, st in self.states.items():
            if st.counts is not None:
                w = st.weighted.view(self.B, self.L, -1).to(self.model_dtype)
                self.recorder.block_counted(site, st.counts[:done], w)


def sdpa_reference(q: Tensor, k: Tensor, v: Tensor, mask_bias: Tensor | None) -> Tensor:
    """softmax(q·kᵀ/√d + mask)·v in float64: what the fused backend's attention approximates."""
    q, k, v = (z.to(torch.float64) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask_bias is not None:
        scores = scores + mask_bias.to(torch.float64)
    return torch.softmax(scores, -1) @ v


def simulate_multistep(model: SpikingBertForSequenceClassification, input_ids: Tensor,
                       attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                       timesteps: int = 80, record=None, options: EngineOptions | None = None):
    """:func:`~spikingbert_sim.simulation.simulate` with ``engine="fast"`` and explicit
    :class:`EngineOptions` (backend, operand format, attention precision, chunking)."""
    from .simulation import _simulate

    return _simulate(model, input_ids, attention_mask, token_type_ids, timesteps, "fast", record, options)


# ---------------------------------------------------------------------------------------------
# Spike-by-spike comparison with the reference engine (tests, benchmarks)
# ---------------------------------------------------------------------------------------------

def pack_spikes(spikes: Tensor) -> Tensor:
    """(..., W) spikes of any dtype (nonzero = spike) -> (..., ⌈W/8⌉) uint8 bit masks."""
    s = (spikes.view(torch.int8) != 0) if spikes.element_size() == 1 else (spikes != 0)
    pad = (-s.shape[-1]) % 8
    if pad:
        s = F.pad(s, (0, pad))
    bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=s.device)
    return (s.reshape(*s.shape[:-1], -1, 8).to(torch.uint8) * bits).sum(-1, dtype=torch.uint8)


def _popcount(x: Tensor) -> int:
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32, device=x.device)
    total = 0
    flat = x.reshape(-1)
    for i in range(0, flat.numel(), 1 << 26):
        total += int(table[flat[i:i + (1 << 26)].to(torch.int64)].sum())
    return total


@torch.no_grad()
def spike_mismatch(model: SpikingBertForSequenceClassification, input_ids: Tensor,
                   attention_mask: Tensor | None, timesteps: int,
                   options: EngineOptions | None = None,
                   other: SpikingBertForSequenceClassification | None = None) -> dict:
    """Run the reference engine and the multi-step engine on one batch; count, per site, the
    (step, sequence, token, neuron) spike slots where they differ.

    With ``other`` (e.g. a float64 copy of ``model``), compare with the reference engine running
    ``other`` instead: how much rounding alone moves the spikes.

    Returns ``{"per_site": {site: count}, "mismatch": total, "slots": T·B·L·Σ widths}``. The
    reference's spikes are kept bit-packed on the device (one bit per slot).
    """
    from .simulation import Recorder, _run_reference, attention_mask_bias

    model.eval()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    packed: dict[str, list[Tensor]] = {}
    stacked: dict[str, Tensor] = {}
    mismatch = {s: 0 for s in model.site_names()}

    class Keep(Recorder):
        def step(self, site, spikes):
            super().step(site, spikes)
            packed.setdefault(site, []).append(pack_spikes(spikes))

    class Compare(Recorder):
        t = {}

        def step(self, site, spikes):  # when the other side is a reference engine too
            super().step(site, spikes)
            t0 = self.t.get(site, 0)
            self.on_spikes(site, t0, spikes.unsqueeze(0))
            self.t[site] = t0 + 1

        def on_spikes(self, site, t0, spikes):
            if site not in stacked:
                stacked[site] = torch.stack(packed.pop(site))
            ref = stacked[site][t0:t0 + spikes.shape[0]]
            mismatch[site] += _popcount(ref ^ pack_spikes(spikes))

    emb = model.embeddings(input_ids)
    bias = attention_mask_bias(attention_mask, emb.dtype)
    _run_reference(model, emb, bias, timesteps, Keep(model, attention_mask, timesteps))
    if other is None:
        run_multistep(model, emb, bias, timesteps, Compare(model, attention_mask, timesteps), options)
    else:
        other.eval()
        emb = other.embeddings(input_ids)
        _run_reference(other, emb, attention_mask_bias(attention_mask, emb.dtype), timesteps,
                       Compare(other, attention_mask, timesteps))
    B, L = input_ids.shape
    slots = timesteps * B * L * sum(model.site_width(s) for s in model.site_names())
    return {"per_site": mismatch, "mismatch": sum(mismatch.values()), "slots": slots}
