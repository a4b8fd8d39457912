r"""Subtract-reset leaky integrate-and-fire neurons (SPEC §1).

Per neuron and time step, with input current :math:`I[t]`, leak :math:`\gamma` and threshold
:math:`V_{th}`:

.. math::

    u[t+\delta] &= \gamma\, u[t] + I[t] \\
    s[t+1]      &= H\big(u[t+\delta] - V_{th}\big) \\
    u[t+1]      &= u[t+\delta] - V_{th}\, s[t+1]

with :math:`u[0] = 0` and :math:`H(x) = 1` for :math:`x > 0`, else 0 (snnTorch's convention: a
membrane exactly at threshold does not fire). The spike and the reset happen in the same step:
the membrane a step returns is already reset.

Two forms of the same dynamics live here, in SpikingJelly's manner:

* :func:`if_step` / :func:`if_scan`: pure functions of tensors, used by the fast engine and as the
  closed-form reference in tests;
* :class:`SubtractResetLIF`: an ``snntorch.Leaky`` neuron pinned to this ordering, used by the
  reference engine (one call per time step) and by BPTT training (surrogate gradient).

Why not plain ``snntorch.Leaky(reset_mechanism="subtract")``: with its default ``reset_delay=True``
the reset decided at step t is applied inside step t+1, so the membrane it returns has not been
reset yet (a neuron with constant input 1.5 returns u = 1.5, 2.0, 2.5, ... instead of 0.5, 1.0,
1.5). With ``reset_delay=False`` it subtracts at once, but it also subtracts a "pending" reset
computed from the previous membrane when that membrane is still above threshold, which changes
which spikes fire when a large input is followed by a small one. :class:`SubtractResetLIF`
uses ``reset_delay=False`` and declares that no reset is ever pending, which gives exactly the
equations above (tested in closed form in ``tests/test_neurons.py``).
"""

from __future__ import annotations

import snntorch as snn
import torch
from torch import Tensor


def initial_membrane(like: Tensor, threshold: float = 1.0, fraction: float = 0.0) -> Tensor:
    """U[0] shaped like ``like``: ``fraction · V_th`` everywhere (zeros by default)."""
    if fraction == 0.0:
        return torch.zeros_like(like)
    return torch.full_like(like, fraction * threshold)


def if_step(current: Tensor, mem: Tensor, threshold: float = 1.0, leak: float = 1.0) -> tuple[Tensor, Tensor]:
    """One time step of the subtract-reset LIF neuron. Returns ``(spike, new_membrane)``."""
    mem = leak * mem + current
    spike = (mem > threshold).to(mem.dtype)
    return spike, mem - threshold * spike


def if_scan(currents: Tensor, threshold: float = 1.0, leak: float = 1.0,
            mem: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run :func:`if_step` over the leading time axis of ``currents`` (T, ...).

    Returns ``(spikes (T, ...), final membrane (...))``. The reference for every faster scan.
    """
    mem = torch.zeros_like(currents[0]) if mem is None else mem
    spikes = torch.empty_like(currents)
    for t in range(currents.shape[0]):
        spikes[t], mem = if_step(currents[t], mem, threshold, leak)
    return spikes, mem


def asr_weights(timesteps: int, leak: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Normaliser of Eqn 2: :math:`\sum_{\tau \le t} \gamma^{t-\tau}` for t = 1..T, shape (T,)."""
    if leak == 1.0:
        return torch.arange(1, timesteps + 1, dtype=dtype)
    powers = leak ** torch.arange(timesteps, dtype=dtype)
    return torch.cumsum(powers, 0)


def asr_from_spikes(spikes: Tensor, leak: float = 1.0) -> Tensor:
    r"""ASR trace (Eqn 2) of a spike train with time first: (T, ...) -> (T, ...).

    :math:`a[t] = \sum_{\tau \le t} \gamma^{t-\tau} s[\tau] / \sum_{\tau \le t} \gamma^{t-\tau}`;
    for γ = 1 the running mean of the spikes.
    """
    T = spikes.shape[0]
    norm = asr_weights(T, leak, spikes.dtype).view(T, *([1] * (spikes.dim() - 1)))
    if leak == 1.0:
        return torch.cumsum(spikes, 0) / norm
    acc = torch.zeros_like(spikes[0])
    out = torch.empty_like(spikes)
    for t in range(T):
        acc = leak * acc + spikes[t]
        out[t] = acc
    return out / norm


def steady_state(current: Tensor, threshold: float = 1.0) -> Tensor:
    """Equilibrium ASR of an IF neuron under constant input: ``clip(I / V_th, 0, 1)`` (SPEC §2, §5)."""
    return torch.clamp(current / threshold, 0.0, 1.0)


class SubtractResetLIF(snn.Leaky):
    """``snntorch.Leaky`` pinned to SPEC Eqn 1 (reset by subtraction in the step that fires).

    Call as ``spike, mem = neuron(current, mem)`` with an explicit membrane (start from zeros).
    The spike comes back in the membrane's dtype (snnTorch's surrogate returns float32).

    Args:
        threshold: V_th.
        leak: γ in (0, 1]; 1.0 is integrate-and-fire.
        spike_grad: snnTorch surrogate for BPTT (default: snnTorch's arctan surrogate).
    """

    def __init__(self, threshold: float = 1.0, leak: float = 1.0, spike_grad=None) -> None:
        super().__init__(beta=leak, threshold=threshold, spike_grad=spike_grad,
                         reset_mechanism="subtract", reset_delay=False)
        # snnTorch stores V_th and γ as float32 buffers, so after `.double()` a threshold of 0.7
        # would be float32(0.7) = 0.69999998...: a float64 membrane of exactly 0.7 would fire, unlike
        # if_step. Keep the exact values in float64; float32 models cast them down as before.
        self.threshold = torch.as_tensor(threshold, dtype=torch.float64)
        self.beta = torch.as_tensor(leak, dtype=torch.float64)
        # snnTorch keeps every neuron ever built in a class-level list (for init_hidden); we pass
        # the membrane explicitly, so drop ours from it and let it be garbage collected.
        instances = snn.SpikingNeuron.instances
        if instances and instances[-1] is self:
            instances.pop()

    def mem_reset(self, mem: Tensor) -> Tensor:
        # The membrane we receive was already reset in the step that fired, so no reset is
        # pending; snnTorch's `do_reset = spk - reset` then subtracts V_th exactly when spk = 1.
        return torch.zeros_like(mem)

    def forward(self, current: Tensor, mem: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        spike, mem = super().forward(current, mem)
        return spike.to(mem.dtype), mem
