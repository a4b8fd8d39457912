"""Time-stepped simulation of a spiking BERT, with recording of ASR traces and spike rasters.

Two engines compute the same spikes (``tests/test_simulation.py`` checks equality in float64):

* ``reference``: one time step at a time through snnTorch neurons (:class:`SubtractResetLIF`);
  the faithful baseline, and the only one that runs models with a feedback connection.
* ``fast`` (default): layer by layer, all T steps at once (:mod:`spikingbert_sim.engine`). Each
  layer's input currents for every step are one large matrix product over T·B·L rows, then the
  neuron recurrence runs over T as a scan (in place on the CPU; a fused Triton kernel of
  :mod:`spikingbert_sim.kernels` on CUDA). Exact, because the network is feed-forward inside a
  time step (SPEC §3); on CUDA the fused kernels round differently, see ``benchmarks/README.md``.

Recording never touches the dynamics: the engines hand each site's spikes to a :class:`Recorder`
after they are computed. The mean ASR trace of a site is the mean over its *valid* neurons
(padding tokens excluded) of Eqn 2's ASR at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .model import SpikingBertForSequenceClassification, attention_mask_bias
from .neurons import SubtractResetLIF, asr_weights, initial_membrane

ENGINES = ("reference", "fast")
DEFAULT_SETTLE_TOL = 0.01


@dataclass(frozen=True)
class RecordOptions:
    """What to record beyond the always-on mean ASR traces, final ASRs and spike counts.

    per_neuron: keep per-neuron ASR traces, (T, B, L, width), for the sites in ``sites``.
    sites: sites for per-neuron traces; None means every site.
    raster_sites: sites whose spike rasters to keep.
    raster_sequences / raster_tokens / raster_neurons: which sequences, token positions and
        neurons the rasters keep; an int ``raster_neurons`` means the first that many.
    """

    per_neuron: bool = False
    sites: tuple[str, ...] | None = None
    raster_sites: tuple[str, ...] = ()
    raster_sequences: tuple[int, ...] = (0,)
    raster_tokens: tuple[int, ...] = (0,)
    raster_neurons: int | tuple[int, ...] = 64
    logits_trace: bool = False  # keep the head's output after every step, (T, B, num_labels)


@dataclass(frozen=True)
class AdaptiveOptions:
    """Stop a batch early once its output layer has settled (``simulate(..., adaptive=...)``).

    The head reads the final layer's [CLS] ASR (or its token mean: ``config.readout``) after every
    step. Every ``check_every`` steps, from step ``min_steps`` on, the batch stops at step t when
    *every* sequence has settled over the window (t − ``window``, t]:

    * its prediction did not change: the same class at every step of the window (classifiers), or
      a spread of at most ``value_tol`` (regression heads);
    * the output-layer ASR the head reads moved by at most ``asr_tol``: the mean over neurons of
      |a[t] − a[t − window]| ≤ ``asr_tol``.

    The decision at step t uses only steps ≤ t, so stopping changes nothing that was computed:
    the result equals a fixed-T simulation with T = the stopping step. ``max_steps`` is the
    ``timesteps`` argument of :func:`simulate`.
    """

    window: int = 8  # steps the prediction and the ASR must hold still
    asr_tol: float = 0.02  # mean |Δ ASR| of the read output neurons ([CLS] or token mean) over the window
    value_tol: float = 0.05  # regression heads: spread of the predicted value over the window
    min_steps: int = 8  # never stop before this step
    check_every: int = 4  # steps between checks (the fast engine's time chunk)

    def __post_init__(self) -> None:
        for name in ("window", "min_steps", "check_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"adaptive {name} must be a positive integer, got {v!r}")
        for name in ("asr_tol", "value_tol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"adaptive {name} must be a number >= 0, got {v!r}")


def settling_step(trace: np.ndarray | Tensor, tol: float = DEFAULT_SETTLE_TOL) -> int:
    """First time step t (1-based) after which the trace stays within ``tol`` of its final value.

    That is the smallest t with |a[t'] − a[T]| ≤ tol for every t' ≥ t. The final value stands for
    the equilibrium; with the default tol = 0.01 a layer has settled once its mean ASR no longer
    moves by more than one spike per hundred neuron-steps.
    """
    a = np.asarray(trace.detach().cpu() if isinstance(trace, Tensor) else trace, dtype=np.float64)
    outside = np.nonzero(np.abs(a - a[-1]) > tol)[0]
    return int(outside[-1]) + 2 if outside.size else 1


@dataclass
class SimulationResult:
    """Everything one simulation measured. Traces are time-first; sites are named as in
    :meth:`SpikingBertForSequenceClassification.site_names`."""

    logits: Tensor  # (B, num_labels)
    timesteps: int  # T
    leak: float  # γ used for the ASRs
    asr: dict[str, Tensor]  # final ASR per neuron, (B, L, width)
    asr_trace: dict[str, Tensor]  # mean ASR over valid neurons at each step, (T,) float64
    spike_counts: dict[str, float]  # spikes over valid neurons and all T steps
    neuron_counts: dict[str, int]  # valid neurons (valid tokens × width)
    neuron_asr_trace: dict[str, Tensor] = field(default_factory=dict)  # (T, B, L, width) on request
    rasters: dict[str, Tensor] = field(default_factory=dict)  # (T, sequences, tokens, neurons) uint8
    raster_index: dict[str, tuple] = field(default_factory=dict)  # (sequences, tokens, neurons) kept
    logits_trace: Tensor | None = None  # (T, B, num_labels): the head after every step, on request
    max_timesteps: int | None = None  # the T asked for; > timesteps when an adaptive run stopped early

    @property
    def stopped_early(self) -> bool:
        return self.max_timesteps is not None and self.timesteps < self.max_timesteps

    def predictions(self) -> Tensor:
        """Class ids (argmax), or the regression value when the head has one output."""
        return self.logits.squeeze(-1) if self.logits.shape[-1] == 1 else self.logits.argmax(-1)

    def settling_steps(self, tol: float = DEFAULT_SETTLE_TOL) -> dict[str, int]:
        return {site: settling_step(trace, tol) for site, trace in self.asr_trace.items()}

    def spikes_per_neuron(self) -> dict[str, float]:
        """Spikes per valid neuron over the T steps, per site."""
        return {s: self.spike_counts[s] / max(self.neuron_counts[s], 1) for s in self.spike_counts}

    def total_spikes(self) -> float:
        return float(sum(self.spike_counts.values()))


class Recorder:
    """Collects ASR statistics from spikes an engine hands over, step by step or all at once.

    Statistics stay on the simulation's device until :meth:`finish`: no host sync per step.
    """

    def __init__(self, model: SpikingBertForSequenceClassification, attention_mask: Tensor,
                 timesteps: int, options: RecordOptions | None = None,
                 adaptive: AdaptiveOptions | None = None) -> None:
        self.options = options or RecordOptions()
        self.timesteps = timesteps  # the most steps an engine may run
        self.adaptive = adaptive
        self.output_site = model.output_site
        self._pool, self._head = model.pool, model.classifier
        self._pool_all = model.config.readout != "cls"  # whether the head reads every token or [CLS] only
        self.dtype = model.classifier.weight.dtype
        self.track_readout = self.options.logits_trace or adaptive is not None
        self._read_weighted: Tensor | None = None  # Σ γ^{t-τ} s[τ] of the output neurons the head reads
        self._pooled_history: list[Tensor] = []  # what the head read after each step, (B, D) each
        self._logit_steps: list[Tensor] = []  # head output after each step, (B, C) each
        self.stop_step: int | None = None  # the step an adaptive run stopped at
        self.leak = float(model.config.leak)
        self.mask = attention_mask.to(torch.bool)  # (B, L)
        self.valid_tokens = int(self.mask.sum())
        self.all_valid = self.valid_tokens == self.mask.numel()
        self.widths = {s: model.site_width(s) for s in model.site_names()}
        unknown = set(self.options.raster_sites) | set(self.options.sites or ())
        unknown -= set(self.widths)
        if unknown:
            raise ConfigError(f"unknown site(s) to record: {', '.join(sorted(unknown))}")
        self.per_neuron_sites = set(self.widths if self.options.sites is None else self.options.sites)
        self.weighted: dict[str, Tensor] = {}  # Σ γ^{t-τ} s[τ] per neuron, (B, L, width)
        self.step_means: dict[str, list[Tensor]] = {s: [] for s in self.widths}  # mean spike per step
        self.totals: dict[str, Tensor] = {}
        self.per_neuron: dict[str, list[Tensor]] = {}
        self.rasters: dict[str, list[Tensor]] = {}
        self.raster_index: dict[str, tuple] = {}
        self._norm = asr_weights(timesteps, self.leak)  # (T,) float64, CPU

    def _valid(self, spikes: Tensor) -> Tensor:
        """Spikes with padding tokens zeroed: (..., B, L, W)."""
        if self.all_valid:  # multiplying by 1 changes nothing: skip the pass over the spikes
            return spikes
        return spikes * self.mask[..., None].to(spikes.dtype)

    def _raster_select(self, site: str, spikes: Tensor) -> Tensor:
        """(..., B, L, W) -> (..., sequences, tokens, neurons) as uint8."""
        o = self.options
        B, L, W = spikes.shape[-3:]
        seqs = [i for i in o.raster_sequences if i < B]
        toks = [i for i in o.raster_tokens if i < L]
        neurons = list(range(min(o.raster_neurons, W))) if isinstance(o.raster_neurons, int) \
            else [i for i in o.raster_neurons if i < W]
        self.raster_index[site] = (tuple(seqs), tuple(toks), tuple(neurons))
        dev = spikes.device
        sel = spikes.index_select(-3, torch.tensor(seqs, device=dev, dtype=torch.long))
        sel = sel.index_select(-2, torch.tensor(toks, device=dev, dtype=torch.long))
        sel = sel.index_select(-1, torch.tensor(neurons, device=dev, dtype=torch.long))
        return sel.to(torch.uint8)

    def step(self, site: str, spikes: Tensor) -> None:
        """Record one time step of ``site``'s spikes, (B, L, W)."""
        self.block(site, spikes.unsqueeze(0))

    def block(self, site: str, spikes: Tensor) -> None:
        """Record consecutive time steps of ``site``'s spikes at once, (t, B, L, W)."""
        valid = self._valid(spikes)
        self._add_step_counts(site, valid.sum(dim=(-3, -2, -1)))  # (t,)
        acc = self.weighted.get(site)
        if self.leak == 1.0:
            acc = spikes.sum(0) if acc is None else acc + spikes.sum(0)
            if self.options.per_neuron and site in self.per_neuron_sites:
                base = 0 if len(self.per_neuron.get(site, [])) == 0 else self.weighted[site]
                self.per_neuron.setdefault(site, []).append(torch.cumsum(spikes, 0) + base)
        else:
            for s in spikes:
                acc = s.clone() if acc is None else self.leak * acc + s
                if self.options.per_neuron and site in self.per_neuron_sites:
                    self.per_neuron.setdefault(site, []).append(acc.unsqueeze(0))
        self.weighted[site] = acc
        self.raster(site, spikes)
        if site == self.output_site and self.track_readout:
            self.readout_block(spikes)

    # --- the head after every step: logits traces and adaptive stopping -------------------------

    @property
    def steps_done(self) -> int:
        """Steps recorded so far at the output site (the last site of a step)."""
        return sum(int(c.numel()) for c in self.step_means[self.output_site])

    def readout_block(self, spikes: Tensor) -> None:
        """Apply the head to the output ASR (the [CLS] position's, or every token's for a ``mean``
        readout) after each of consecutive steps (t, B, L, D) of the output site's spikes. Engines
        that record statistics in a kernel call this themselves."""
        # the same arithmetic as block(), final_asr() and model.readout(), so the last step's logits
        # equal the result's
        read = (spikes if self._pool_all else spikes[:, :, :1, :]).to(self.dtype)  # (t, B, L or 1, D)
        t0 = len(self._pooled_history)
        acc = self._read_weighted
        for i, s in enumerate(read):
            acc = s.clone() if acc is None else (acc + s if self.leak == 1.0 else self.leak * acc + s)
            pooled = self._pool(acc / float(self._norm[t0 + i]), self.mask)  # (B, D)
            self._pooled_history.append(pooled)
            self._logit_steps.append(self._head(pooled))
        self._read_weighted = acc

    def should_stop(self) -> bool:
        """Whether an adaptive run may stop after the steps recorded so far (see
        :class:`AdaptiveOptions`); engines ask after every chunk (the reference after every step)."""
        a = self.adaptive
        t = len(self._pooled_history)
        if a is None or self.stop_step is not None:
            return self.stop_step is not None
        if t < max(a.min_steps, a.window + 1) or t >= self.timesteps or t % a.check_every:
            return False
        recent = torch.stack(self._logit_steps[t - a.window:t])  # (window, B, C)
        if recent.shape[-1] == 1:
            spread = recent[..., 0].amax(0) - recent[..., 0].amin(0)
            steady = bool((spread <= a.value_tol).all())
        else:
            classes = recent.argmax(-1)
            steady = bool((classes == classes[-1]).all())
        moved = (self._pooled_history[t - 1] - self._pooled_history[t - 1 - a.window]).abs().mean(-1)  # (B,)
        if steady and bool((moved <= a.asr_tol).all()):
            self.stop_step = t
            return True
        return False

    def _add_step_counts(self, site: str, per_step: Tensor) -> None:
        self.step_means[site].append(per_step.to(torch.float64) / (self.valid_tokens * self.widths[site]))
        self.totals[site] = self.totals.get(site, 0) + per_step.sum().to(torch.float64)

    def raster(self, site: str, spikes: Tensor) -> None:
        """Keep the raster selection of consecutive steps of spikes (t, B, L, W), if ``site`` has one."""
        if site in self.options.raster_sites:
            self.rasters.setdefault(site, []).append(self._raster_select(site, spikes))

    def block_counted(self, site: str, step_counts: Tensor, weighted: Tensor) -> None:
        """Statistics that a fused kernel computed while it ran: spikes of valid tokens at each
        step (t,), and the ASR numerator Σ_τ γ^{t-τ} s[τ] (B, L, W) after those steps, which
        replaces the site's. Equivalent to :meth:`block` on the same spikes (rasters aside: pass
        them to :meth:`raster`); per-neuron traces need :meth:`block`."""
        self._add_step_counts(site, step_counts)
        self.weighted[site] = weighted

    def final_asr(self, site: str) -> Tensor:
        return self.weighted[site] / float(self._norm[self.steps_done - 1])

    def finish(self, logits: Tensor) -> SimulationResult:
        T = self.steps_done
        traces = {}
        for site, chunks in self.step_means.items():
            means = torch.cat(chunks).cpu()  # (T,) mean spike per valid neuron at each step
            if means.numel() != T:
                raise RuntimeError(f"site {site} recorded {means.numel()} steps, expected {T}")
            if self.leak == 1.0:
                weighted = torch.cumsum(means, 0)
            else:
                weighted = torch.empty_like(means)
                acc = 0.0
                for t in range(T):
                    acc = self.leak * acc + means[t]
                    weighted[t] = acc
            traces[site] = weighted / self._norm[:T]
        norm = self._norm[:T].to(logits.device)
        per_neuron = {}
        for site, chunks in self.per_neuron.items():
            w = torch.cat(chunks)
            per_neuron[site] = w / norm.view(T, 1, 1, 1).to(w.dtype)
        return SimulationResult(
            logits=logits,
            timesteps=T,
            leak=self.leak,
            asr={s: self.final_asr(s) for s in self.weighted},
            asr_trace=traces,
            spike_counts={s: float(v) for s, v in self.totals.items()},
            neuron_counts={s: self.valid_tokens * w for s, w in self.widths.items()},
            neuron_asr_trace=per_neuron,
            rasters={s: torch.cat(v).cpu() for s, v in self.rasters.items()},
            raster_index=dict(self.raster_index),
            logits_trace=torch.stack(self._logit_steps).cpu() if self.options.logits_trace else None,
            max_timesteps=self.timesteps,
        )


def check_timesteps(timesteps: object) -> int:
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps <= 0:
        raise ConfigError(f"timesteps must be a positive integer, got {timesteps!r}")
    return int(timesteps)


def _run_reference(model: SpikingBertForSequenceClassification, embedded: Tensor, mask_bias: Tensor,
                   timesteps: int, recorder: Recorder) -> None:
    """One step at a time through snnTorch neurons (one neuron module per site)."""
    cfg = model.config
    neurons = {s: SubtractResetLIF(cfg.threshold, cfg.leak).to(embedded.device, embedded.dtype)
               for s in model.site_names()}
    mems: dict[str, Tensor] = {}

    def fire(site: str, current: Tensor) -> Tensor:
        mem = mems.get(site)
        if mem is None:
            mem = initial_membrane(current, cfg.threshold, cfg.initial_membrane)
        spike, mems[site] = neurons[site](current, mem)
        recorder.step(site, spike)
        return spike

    last = None
    for _ in range(timesteps):
        last = model.encode(model.input_current(embedded, last), fire, mask_bias)
        if recorder.should_stop():
            break


def _run_fast(model: SpikingBertForSequenceClassification, embedded: Tensor, mask_bias: Tensor,
              timesteps: int, recorder: Recorder, options=None) -> None:
    """Layer by layer with all T steps at once (in time chunks when memory is short): see
    :mod:`spikingbert_sim.engine`."""
    if model.feedback is not None:
        raise ConfigError("the fast engine cannot run a model with a feedback connection; use engine='reference'")
    from .engine import run_multistep

    run_multistep(model, embedded, mask_bias, timesteps, recorder, options)


def simulate(model: SpikingBertForSequenceClassification, input_ids: Tensor,
             attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
             timesteps: int = 80, engine: str = "fast", record: RecordOptions | None = None,
             adaptive: AdaptiveOptions | None = None) -> SimulationResult:
    """Simulate ``timesteps`` steps of spiking inference on a batch (no gradients).

    Args:
        input_ids, attention_mask, token_type_ids: (B, L) as a BERT tokenizer returns them.
        timesteps: T, a positive integer.
        engine: ``"fast"`` (default; falls back to ``"reference"`` for feedback models) or
            ``"reference"``.
        record: what else to record (per-neuron traces, rasters, the head after every step); see
            :class:`RecordOptions`.
        adaptive: stop before ``timesteps`` once the output layer has settled (see
            :class:`AdaptiveOptions`); ``result.timesteps`` is then the step it stopped at.

    Returns a :class:`SimulationResult`; its logits come from the final layer's [CLS] ASR
    (or its token mean: ``config.readout``).
    """
    return _simulate(model, input_ids, attention_mask, token_type_ids, timesteps, engine, record,
                     adaptive=adaptive)


def _simulate(model: SpikingBertForSequenceClassification, input_ids: Tensor,
              attention_mask: Tensor | None, token_type_ids: Tensor | None, timesteps: int, engine: str,
              record: RecordOptions | None, options=None, adaptive: AdaptiveOptions | None = None) -> SimulationResult:
    """:func:`simulate` with the fast engine's :class:`~spikingbert_sim.engine.EngineOptions`."""
    timesteps = check_timesteps(timesteps)
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > model.config.max_position_embeddings:
        raise ConfigError(f"sequence of {input_ids.shape[1]} tokens exceeds max_position_embeddings "
                          f"({model.config.max_position_embeddings})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                          f"{tuple(input_ids.shape)}")
    if engine == "fast" and model.feedback is not None:
        engine = "reference"
    was_training = model.training
    switch = any(m.training for m in model.modules())  # eval() walks every module: only when needed
    if switch:
        model.eval()
    try:
        with torch.no_grad():
            embedded = model.embeddings(input_ids, token_type_ids)  # (B, L, D)
            mask_bias = attention_mask_bias(attention_mask, embedded.dtype)
            recorder = Recorder(model, attention_mask, timesteps, record, adaptive)
            if engine == "reference":
                _run_reference(model, embedded, mask_bias, timesteps, recorder)
            else:
                _run_fast(model, embedded, mask_bias, timesteps, recorder, options)
            logits = model.readout(recorder.final_asr(model.output_site).to(embedded.dtype), attention_mask)
            return recorder.finish(logits)
    finally:
        if switch:
            model.train(was_training)


def simulate_batches(model: SpikingBertForSequenceClassification, batches: Sequence[dict[str, Tensor]],
                     **kwargs) -> list[SimulationResult]:
    """:func:`simulate` over several tokenized batches (dicts with input_ids, attention_mask, ...)."""
    return [simulate(model, b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"), **kwargs)
            for b in batches]
