r"""Training a spiking BERT: implicit differentiation at equilibrium (SPEC §5) and the BPTT baseline.

Equilibrium training, one step
------------------------------
1. **Measure** (no autograd): simulate T steps of the spiking network and take every site's final
   ASR :math:`a^*` (Eqn 2) with the fast multi-step engine (:mod:`spikingbert_sim.engine`):
   layer by layer, a chunk of time steps at once (exact because the network is feed-forward
   inside a time step; membranes carry over between chunks), so memory does not grow with T.
   A model with a feedback connection is simulated step by step (the input layer needs the
   previous step's output).
2. **Differentiable pass** through the steady-state graph: :meth:`model.encode` runs once more on
   ASRs, and every site returns its measured ASR while its gradient flows through the steady-state
   function :math:`\mathrm{clip}(I / V_{th}, 0, 1)` of the current :math:`I` computed from the
   (differentiable) ASRs of the sites before it — [SB]'s "measured value forward, steady-state
   gradient backward". :class:`SteadyStateSTE` does this in one autograd node that saves only a
   1-byte mask per neuron, so the graph is the size of one ASR pass whatever T is.
3. **Feedback** (``config.feedback``): the equilibrium is the fixed point
   :math:`a^* = f(a^*, x)` of the map from the fed-back output ASR to the output ASR. Its gradient
   is :math:`\partial L/\partial\theta = \partial L/\partial a^*\,(I - J_f)^{-1}\,\partial f/\partial\theta`;
   the backward solves :math:`g = \bar g + J_f^\top g` with a solver of
   :mod:`spikingbert_sim.solvers` (vector–Jacobian products by autograd), torchdeq's "implicit
   backward hook" form: one pass computes :math:`f(a^*)` (its graph gives :math:`J_f` and
   :math:`\partial f/\partial\theta`), an identity node :class:`ImplicitBackward` on its output
   turns the incoming gradient into the solution :math:`g`, and a second pass from that node
   computes every site, the logits and the loss. The solver's :class:`SolverStats` of each backward
   are appended to :attr:`StudentOutput.solver_stats`.

Without feedback :math:`J_f = 0` and step 2 is plain autograd through the steady-state functions.
(The steady-state function is exact for integrate-and-fire neurons, γ = 1, SpikingBERT's choice;
for γ < 1 it is SPEC §5's approximation.)

The T → ∞ limit: ``steady_state``
---------------------------------
:func:`steady_state_forward` replaces step 1's measurement by the analog equilibrium itself,
every site firing :math:`\mathrm{clip}(I / V_{th}, 0, 1)` (what the spiking ASRs approach as T
grows; with feedback the fixed point of :func:`steady_state_equilibrium`), and step 2 is unchanged.
No simulation is run, so a step costs one pass instead of T: a cheap warm start before
equilibrium training on measured spiking ASRs (``spikesim train --method steady_state``, then
``--method equilibrium --init <that run>/last.pt``), which adapts the weights to what finite-T
spiking actually computes.

BPTT baseline
-------------
:func:`bptt_forward` unrolls the T steps with snnTorch's surrogate gradient (``atan`` or
``fast_sigmoid``) through :class:`~spikingbert_sim.neurons.SubtractResetLIF` and differentiates
the ASR of Eqn 2; its forward values are exactly the spiking simulation's, its memory grows
linearly with T.

Both return a :class:`StudentOutput`; :func:`student_forward` picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError
from .model import SpikingBertForSequenceClassification, attention_mask_bias
from .neurons import SubtractResetLIF, asr_weights, if_scan, initial_membrane, steady_state
from .solvers import SolverStats, get_solver

METHODS = ("equilibrium", "steady_state", "bptt")
SURROGATES = ("atan", "fast_sigmoid")
DEFAULT_TIME_CHUNK = 8
"""Time steps simulated at once per layer while measuring on CUDA (on the CPU the engine plans
chunks within a fixed working-set budget); bounds the measurement's memory independently of T."""


@dataclass
class StudentOutput:
    """What one differentiable student pass returns.

    ``asr`` values equal the spiking ASRs (measured, or accumulated in BPTT); gradients flow
    through the steady-state graph (equilibrium) or the unrolled surrogate graph (BPTT).
    """

    logits: Tensor  # (B, num_labels), the head on the final layer's [CLS] ASR (or token mean)
    asr: dict[str, Tensor]  # requested sites -> (B, L, width) differentiable ASR
    attention_scores: dict[str, Tensor] = field(default_factory=dict)  # "layer.i.attention_scores" -> (B, H, L, L)
    measured: dict[str, Tensor] | None = None  # every site's measured ASR a* (equilibrium only), detached
    solver_stats: list[SolverStats] = field(default_factory=list)  # one per backward (feedback models)


# --- step 1: measuring the equilibrium --------------------------------------------------------------

def check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _resolve_chunk(time_chunk: int | None, device: torch.device) -> int | None:
    if time_chunk is not None:
        return check_positive("time_chunk", time_chunk)
    return None if device.type == "cpu" else DEFAULT_TIME_CHUNK


@torch.no_grad()
def measure_equilibrium(model: SpikingBertForSequenceClassification, embedded: Tensor, mask_bias: Tensor,
                        timesteps: int, time_chunk: int | None = None) -> dict[str, Tensor]:
    """Simulate ``timesteps`` steps and return every site's final ASR (Eqn 2), (B, L, width).

    Runs the project's multi-step engine (:func:`spikingbert_sim.engine.run_multistep`, the fast
    engine of :func:`~spikingbert_sim.simulation.simulate`, so the values are exactly what
    evaluation measures) in time chunks of ``time_chunk`` steps, membranes carried between chunks:
    peak memory is bounded by the chunk, not by T. ``None`` lets the engine plan chunks within its
    CPU working-set budget, and uses :data:`DEFAULT_TIME_CHUNK` on CUDA (whose planner would fill
    a share of free memory). Feedback models run one step at a time (:func:`measure_stepwise`).
    """
    check_positive("timesteps", timesteps)
    chunk = _resolve_chunk(time_chunk, embedded.device)
    if model.feedback is not None:
        return measure_stepwise(model, embedded, mask_bias, timesteps)
    from .engine import EngineOptions, run_multistep
    from .simulation import Recorder

    attention_mask = (mask_bias[:, 0, 0, :] == 0).long()  # (B, L), back from the additive bias
    recorder = Recorder(model, attention_mask, timesteps)
    run_multistep(model, embedded, mask_bias, timesteps, recorder, EngineOptions(chunk_steps=chunk))
    return {site: recorder.final_asr(site) for site in model.site_names()}


@torch.no_grad()
def measure_stepwise(model: SpikingBertForSequenceClassification, embedded: Tensor, mask_bias: Tensor,
                     timesteps: int, chunk: int = 1) -> dict[str, Tensor]:
    """:func:`measure_equilibrium` with :func:`~spikingbert_sim.neurons.if_scan` over chunks of
    ``chunk`` steps through :meth:`model.encode` (the reference engine's arithmetic). A model with
    feedback needs ``chunk = 1``: its input layer takes the previous step's output."""
    check_positive("timesteps", timesteps)
    check_positive("chunk", chunk)
    cfg = model.config
    threshold, leak = cfg.threshold, float(cfg.leak)
    if model.feedback is not None:
        chunk = 1
    mems: dict[str, Tensor] = {}
    acc: dict[str, Tensor] = {}

    def fire(site: str, current: Tensor) -> Tensor:
        if current.dim() == embedded.dim():  # a constant or one-step input current: (B, L, D)
            current = current.expand(steps, *current.shape)  # (C, B, L, D)
        mem = mems[site] if site in mems else initial_membrane(current[0], threshold, cfg.initial_membrane)
        spikes, mems[site] = if_scan(current, threshold, leak, mem)  # (C, B, L, W)
        if leak == 1.0:
            total = spikes.sum(0)
            acc[site] = total if site not in acc else acc[site] + total
        else:
            for s in spikes:
                acc[site] = s.clone() if site not in acc else leak * acc[site] + s
        return spikes

    last: Tensor | None = None
    done = 0
    while done < timesteps:
        steps = min(chunk, timesteps - done)
        if model.feedback is None:
            model.encode(embedded, fire, mask_bias)
        else:
            last = model.encode(model.input_current(embedded, None if last is None else last[0]), fire, mask_bias)
        done += steps
    norm = float(asr_weights(timesteps, leak)[-1])
    return {site: a / norm for site, a in acc.items()}


@torch.no_grad()
def steady_state_equilibrium(model: SpikingBertForSequenceClassification, embedded: Tensor, mask_bias: Tensor,
                             tol: float = 1e-12, max_iter: int = 10_000) -> dict[str, Tensor]:
    """Every site's ASR in the analog (steady-state) network: ``fire = clip(I / V_th, 0, 1)``.

    Without feedback this is one pass; with feedback the fixed point of the output map, found by
    plain iteration until the output changes by at most ``tol`` (max-norm). It is what the spiking
    ASRs approach as T grows, and an exact equilibrium for testing implicit gradients.
    """
    threshold = model.config.threshold
    sites: dict[str, Tensor] = {}

    def fire(site: str, current: Tensor) -> Tensor:
        sites[site] = steady_state(current, threshold)
        return sites[site]

    if model.feedback is None:
        model.encode(embedded, fire, mask_bias)
        return sites
    z = model.encode(embedded, fire, mask_bias)
    for _ in range(max_iter):
        z_new = model.encode(model.input_current(embedded, z), fire, mask_bias)
        delta = float((z_new - z).abs().max())
        z = z_new
        if delta <= tol:
            return dict(sites)
    raise ConfigError(f"the steady-state feedback map did not converge in {max_iter} iterations "
                      f"(last change {delta:.3g}); is the feedback contractive?")


# --- step 2: the differentiable pass -------------------------------------------------------------

class SteadyStateSTE(torch.autograd.Function):
    r"""Forward: the measured ASR. Backward: the gradient of :math:`\mathrm{clip}(I / V_{th}, 0, 1)`.

    Same gradient as autograd through ``torch.clamp(current / threshold, 0, 1)`` (clamp passes the
    gradient where its input lies in [0, 1], boundaries included), but the value is exactly the
    spiking ASR and only a boolean mask is kept for the backward.
    """

    @staticmethod
    def forward(ctx, current: Tensor, measured: Tensor, threshold: float) -> Tensor:
        x = current / threshold
        ctx.save_for_backward((x >= 0) & (x <= 1))
        ctx.threshold = threshold
        return measured.to(current.dtype).clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask / ctx.threshold, None, None


class _ImplicitContext:
    """What :class:`ImplicitBackward` needs: the graph of ``z1 = f(z_star)`` and the solver."""

    def __init__(self, z1: Tensor, z_star: Tensor, solver: str, options: dict[str, Any],
                 sink: list[SolverStats]) -> None:
        self.z1, self.z_star = z1, z_star
        self.solver = get_solver(solver)
        self.options = options
        self.sink = sink


class ImplicitBackward(torch.autograd.Function):
    r"""Identity forward; backward maps the incoming gradient :math:`\bar g` to the solution of
    :math:`g = \bar g + J_f^\top g`, i.e. :math:`g = (I - J_f)^{-\top}\bar g`, with
    :math:`J_f^\top v` from autograd on the retained graph of :math:`f`."""

    @staticmethod
    def forward(ctx, z1: Tensor, context: _ImplicitContext) -> Tensor:
        ctx.context = context
        return z1.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        c: _ImplicitContext = ctx.context

        def fixed_point_map(y: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(c.z1, c.z_star, y, retain_graph=True)
            return grad + vjp

        solution, stats = c.solver(fixed_point_map, grad, **c.options)
        c.sink.append(stats)
        ctx.context = None  # drop the graph reference once used
        return solution, None


def _embed(model: SpikingBertForSequenceClassification, input_ids: Tensor, attention_mask: Tensor | None,
           token_type_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    embedded = model.embeddings(input_ids, token_type_ids)  # (B, L, D)
    return embedded, attention_mask_bias(attention_mask, embedded.dtype)


def _sites(model: SpikingBertForSequenceClassification, sites: Iterable[str] | None) -> set[str]:
    known = set(model.site_names())
    wanted = set(model.layer_output_sites() if sites is None else sites)
    unknown = wanted - known
    if unknown:
        raise ConfigError(f"unknown site(s): {', '.join(sorted(unknown))}")
    return wanted


def equilibrium_forward(model: SpikingBertForSequenceClassification, input_ids: Tensor,
                        attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None, *,
                        timesteps: int, sites: Iterable[str] | None = None, attention_scores: bool = False,
                        measured: dict[str, Tensor] | None = None, time_chunk: int | None = None,
                        solver: str = "anderson", solver_options: dict[str, Any] | None = None) -> StudentOutput:
    """Measure the spiking equilibrium, then run the differentiable steady-state pass (see module doc).

    Args:
        timesteps: T, simulated steps of the measurement.
        sites: sites whose differentiable ASRs to return (default: ``embeddings`` and every
            ``layer.i.output``, the hidden states distillation needs).
        attention_scores: also return each layer's pre-softmax attention scores (differentiable).
        measured: use these ASRs (every site, (B, L, width)) instead of simulating; e.g. the
            analog equilibrium from :func:`steady_state_equilibrium`, in tests.
        time_chunk: steps simulated at once per layer while measuring (memory vs. speed); None:
            planned by the engine (see :func:`measure_equilibrium`).
        solver, solver_options: implicit backward of feedback models (``fixed_point``,
            ``anderson``, ``broyden``; options ``max_iter``, ``tol``, ...).
    """
    check_positive("timesteps", timesteps)
    keep = _sites(model, sites)
    embedded, mask_bias = _embed(model, input_ids, attention_mask, token_type_ids)
    if measured is None:
        measured = measure_equilibrium(model, embedded.detach(), mask_bias, timesteps, time_chunk)
    missing = set(model.site_names()) - set(measured)
    if missing:
        raise ConfigError(f"measured ASRs lack site(s): {', '.join(sorted(missing))}")
    threshold = model.config.threshold
    asr: dict[str, Tensor] = {}
    scores: dict[str, Tensor] = {}
    recording = [True]

    def fire(site: str, current: Tensor) -> Tensor:
        out = SteadyStateSTE.apply(current, measured[site], threshold)
        if recording[0] and site in keep:
            asr[site] = out
        return out

    def observe(name: str, value: Tensor) -> None:
        if recording[0]:
            scores[name] = value

    stats: list[SolverStats] = []
    if model.feedback is None:
        final = model.encode(embedded, fire, mask_bias, observe if attention_scores else None)
    else:
        out_site = model.output_site
        z_star = measured[out_site].detach().to(embedded.dtype).requires_grad_()
        recording[0] = False
        z1 = model.encode(model.input_current(embedded, z_star), fire, mask_bias)  # f(a*): value a*
        context = _ImplicitContext(z1, z_star, solver, dict(solver_options or {}), stats)
        z = ImplicitBackward.apply(z1, context)
        recording[0] = True
        final = model.encode(model.input_current(embedded, z), fire, mask_bias, observe if attention_scores else None)
    logits = model.readout(final, attention_mask)
    return StudentOutput(logits=logits, asr=asr, attention_scores=scores,
                         measured={k: v.detach() for k, v in measured.items()}, solver_stats=stats)


def steady_state_forward(model: SpikingBertForSequenceClassification, input_ids: Tensor,
                         attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None, *,
                         sites: Iterable[str] | None = None, attention_scores: bool = False,
                         solver: str = "anderson", solver_options: dict[str, Any] | None = None) -> StudentOutput:
    """:func:`equilibrium_forward` at the analog equilibrium (T → ∞) instead of a measured one.

    Without feedback one differentiable pass with every site firing ``clip(I / V_th, 0, 1)``;
    with feedback the analog fixed point (:func:`steady_state_equilibrium`) and the implicit
    backward of :func:`equilibrium_forward`. ``measured`` of the output holds the analog ASRs.
    """
    if model.feedback is not None:
        with torch.no_grad():
            embedded, mask_bias = _embed(model, input_ids, attention_mask, token_type_ids)
            measured = steady_state_equilibrium(model, embedded, mask_bias)
        return equilibrium_forward(model, input_ids, attention_mask, token_type_ids, timesteps=1, sites=sites,
                                   attention_scores=attention_scores, measured=measured, solver=solver,
                                   solver_options=solver_options)
    keep = _sites(model, sites)
    embedded, mask_bias = _embed(model, input_ids, attention_mask, token_type_ids)
    threshold = model.config.threshold
    asr: dict[str, Tensor] = {}
    scores: dict[str, Tensor] = {}

    def fire(site: str, current: Tensor) -> Tensor:
        out = steady_state(current, threshold)
        if site in keep:
            asr[site] = out
        return out

    final = model.encode(embedded, fire, mask_bias, scores.__setitem__ if attention_scores else None)
    return StudentOutput(logits=model.readout(final, attention_mask), asr=asr, attention_scores=scores,
                         measured={k: v.detach() for k, v in asr.items()})


# --- the BPTT baseline ------------------------------------------------------------------------------

def surrogate_function(name: str) -> Callable:
    """snnTorch's surrogate spike gradient by name: ``atan`` (snnTorch's default) or ``fast_sigmoid``."""
    from snntorch import surrogate

    if name == "atan":
        return surrogate.atan()
    if name == "fast_sigmoid":
        return surrogate.fast_sigmoid()
    raise ConfigError(f"unknown surrogate {name!r} (choose from {', '.join(SURROGATES)})")


def bptt_forward(model: SpikingBertForSequenceClassification, input_ids: Tensor,
                 attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None, *,
                 timesteps: int, sites: Iterable[str] | None = None, attention_scores: bool = False,
                 surrogate: str = "atan") -> StudentOutput:
    """Unroll T steps through snnTorch neurons with a surrogate gradient (backprop through time).

    Returns the ASR (Eqn 2) of the requested sites after T steps and the head's logits on the final
    layer's ASR ([CLS] or token mean, ``config.readout``); attention scores are averaged over the T
    steps. Autograd keeps every step's activations, so memory grows linearly with T.
    """
    check_positive("timesteps", timesteps)
    keep = _sites(model, sites) | {model.output_site}
    embedded, mask_bias = _embed(model, input_ids, attention_mask, token_type_ids)
    cfg = model.config
    leak = float(cfg.leak)
    neuron = SubtractResetLIF(cfg.threshold, leak, spike_grad=surrogate_function(surrogate))
    neuron = neuron.to(embedded.device, embedded.dtype)
    mems: dict[str, Tensor] = {}
    acc: dict[str, Tensor] = {}
    score_sums: dict[str, Tensor] = {}

    def fire(site: str, current: Tensor) -> Tensor:
        mem = mems.get(site)
        if mem is None:
            mem = initial_membrane(current, cfg.threshold, cfg.initial_membrane)
        spike, mems[site] = neuron(current, mem)
        if site in keep:
            acc[site] = spike if site not in acc else leak * acc[site] + spike
        return spike

    def observe(name: str, value: Tensor) -> None:
        score_sums[name] = value if name not in score_sums else score_sums[name] + value

    last = None
    for _ in range(timesteps):
        last = model.encode(model.input_current(embedded, last), fire, mask_bias,
                            observe if attention_scores else None)
    norm = float(asr_weights(timesteps, leak)[-1])
    asr = {site: a / norm for site, a in acc.items()}
    logits = model.readout(asr[model.output_site], attention_mask)
    requested = _sites(model, sites)
    return StudentOutput(logits=logits, asr={s: asr[s] for s in requested},
                         attention_scores={k: v / timesteps for k, v in score_sums.items()})


def student_forward(model: SpikingBertForSequenceClassification, batch: dict[str, Tensor], method: str,
                    timesteps: int, **options: Any) -> StudentOutput:
    """:func:`equilibrium_forward`, :func:`steady_state_forward` or :func:`bptt_forward` on a
    tokenized batch, by ``method`` name (``timesteps`` is ignored by ``steady_state``)."""
    args = (batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
    if method == "equilibrium":
        allowed = {"sites", "attention_scores", "measured", "time_chunk", "solver", "solver_options"}
        return equilibrium_forward(model, *args, timesteps=timesteps,
                                   **{k: v for k, v in options.items() if k in allowed})
    if method == "steady_state":
        allowed = {"sites", "attention_scores", "solver", "solver_options"}
        return steady_state_forward(model, *args, **{k: v for k, v in options.items() if k in allowed})
    if method == "bptt":
        allowed = {"sites", "attention_scores", "surrogate"}
        return bptt_forward(model, *args, timesteps=timesteps, **{k: v for k, v in options.items() if k in allowed})
    raise ConfigError(f"unknown training method {method!r} (choose from {', '.join(METHODS)})")
