"""SPEC §1-2: subtract-reset LIF neurons and the average spiking rate, in closed form."""

from fractions import Fraction
from math import ceil

import pytest
import snntorch as snn
import torch

from spikingbert_sim.neurons import (SubtractResetLIF, asr_from_spikes, asr_weights, if_scan, if_step,
                                     steady_state)

F64 = torch.float64


def run_lif(currents, threshold=1.0, leak=1.0):
    """Drive a SubtractResetLIF step by step; returns (spikes, membranes) as lists of floats."""
    neuron = SubtractResetLIF(threshold, leak)
    mem = torch.zeros((), dtype=F64)
    spikes, mems = [], []
    for c in currents:
        s, mem = neuron(torch.tensor(c, dtype=F64), mem)
        spikes.append(float(s))
        mems.append(float(mem))
    return spikes, mems


# (currents, threshold, leak, expected spikes, expected membrane after each step's reset)
HAND_CASES = {
    # u: .3 .6 .9 1.2->.2 .5 .8 1.1->.1 .4 .7
    "constant_0.3": ([0.3] * 9, 1.0, 1.0, [0, 0, 0, 1, 0, 0, 1, 0, 0],
                     [0.3, 0.6, 0.9, 0.2, 0.5, 0.8, 0.1, 0.4, 0.7]),
    # a membrane exactly at threshold does not fire (H is strict): u = 1 at t = 1, then 2 -> 1 ...
    "current_equals_threshold": ([1.0] * 5, 1.0, 1.0, [0, 1, 1, 1, 1], [1.0, 1.0, 1.0, 1.0, 1.0]),
    # above threshold: one spike per step at most, the residue grows (no reset to zero)
    "constant_1.5": ([1.5] * 4, 1.0, 1.0, [1, 1, 1, 1], [0.5, 1.0, 1.5, 2.0]),
    # a large input then nothing: the reset happens in the step that fires, so the second step
    # still sees 2.0 > 1 and fires; then u = 1.0 exactly, which does not fire
    "large_then_zero": ([3.0, 0.0, 0.0, 0.0], 1.0, 1.0, [1, 1, 0, 0], [2.0, 1.0, 1.0, 1.0]),
    "negative": ([-0.5] * 4, 1.0, 1.0, [0, 0, 0, 0], [-0.5, -1.0, -1.5, -2.0]),
    "negative_then_positive": ([-1.0, 1.5, 0.75, 0.75], 1.0, 1.0, [0, 0, 1, 0], [-1.0, 0.5, 0.25, 1.0]),
    # threshold 0.5 with dyadic currents (exact): u = .375, .75->.25, .625->.125, .5 (equal: no), .875->.375
    "threshold_0.5": ([0.375] * 5, 0.5, 1.0, [0, 1, 1, 0, 1], [0.375, 0.25, 0.125, 0.5, 0.375]),
    # leak 0.5: u = .6, .9, 1.05->.05, .625, .9125, 1.05625->.05625
    "leak_0.5": ([0.6] * 6, 1.0, 0.5, [0, 0, 1, 0, 0, 1], [0.6, 0.9, 0.05, 0.625, 0.9125, 0.05625]),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_subtract_reset_lif_matches_hand_computed_sequence(case):
    currents, vth, leak, want_spikes, want_mem = HAND_CASES[case]
    spikes, mems = run_lif(currents, vth, leak)
    assert spikes == want_spikes
    assert mems == pytest.approx(want_mem, abs=1e-12)


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_if_scan_matches_hand_computed_sequence(case):
    currents, vth, leak, want_spikes, want_mem = HAND_CASES[case]
    spikes, mem = if_scan(torch.tensor(currents, dtype=F64), vth, leak)
    assert spikes.tolist() == want_spikes
    assert float(mem) == pytest.approx(want_mem[-1], abs=1e-12)


def closed_form_spike_count(t: int, current: Fraction, threshold: Fraction) -> int:
    """IF neuron (γ = 1), constant input: spikes in the first t steps = clip(ceil(t·I/V_th) − 1, 0, t).

    Follows from u[t] = t·I − V_th·N(t) and the strict threshold: step t fires iff t·I > V_th·(N(t−1) + 1).
    """
    return min(max(ceil(t * current / threshold) - 1, 0), t)


@pytest.mark.parametrize("threshold", [Fraction(1), Fraction(3, 4)])
def test_if_constant_current_closed_form(threshold):
    # Dyadic currents k/16 are exact in float64, so the simulation must match the rational closed form
    # bit for bit, equality-at-threshold cases (t·I = V_th·k) included.
    T = 40
    ks = list(range(-8, 33))
    currents = torch.tensor([k / 16 for k in ks], dtype=F64).expand(T, -1)
    spikes, _ = if_scan(currents, float(threshold))
    counts = torch.cumsum(spikes, 0)
    for j, k in enumerate(ks):
        want = [closed_form_spike_count(t, Fraction(k, 16), threshold) for t in range(1, T + 1)]
        assert counts[:, j].tolist() == want, f"I = {k}/16"


@pytest.mark.parametrize("leak", [1.0, 0.8])
@pytest.mark.parametrize("threshold", [1.0, 0.7])
def test_if_step_and_scan_equal_subtract_reset_lif(leak, threshold):
    g = torch.Generator().manual_seed(0)
    # mixes large, small and negative currents (large-then-small is where reset orderings differ)
    currents = torch.randn(30, 3, 5, generator=g, dtype=F64) * 1.5
    neuron = SubtractResetLIF(threshold, leak)
    mem_n = torch.zeros(3, 5, dtype=F64)
    mem_s = torch.zeros(3, 5, dtype=F64)
    spikes_n = []
    for t in range(30):
        s_n, mem_n = neuron(currents[t], mem_n)
        s_s, mem_s = if_step(currents[t], mem_s, threshold, leak)
        assert s_n.dtype == F64
        assert torch.equal(s_n, s_s)
        assert torch.equal(mem_n, mem_s)
        spikes_n.append(s_n)
    spikes_scan, mem_scan = if_scan(currents, threshold, leak)
    assert torch.equal(torch.stack(spikes_n), spikes_scan)
    assert torch.equal(mem_scan, mem_n)
    assert 0 < float(spikes_scan.mean()) < 1  # the comparison is not between two silent trains


def test_if_scan_continues_from_given_membrane():
    currents = torch.full((6,), 0.375, dtype=F64)  # u: .375 .75 1.125->.125 .5 .875 1.25->.25
    full, mem_full = if_scan(currents)
    first, mem = if_scan(currents[:3])
    second, mem2 = if_scan(currents[3:], mem=mem)
    assert torch.equal(torch.cat([first, second]), full)
    assert torch.equal(mem2, mem_full)
    assert full.tolist() == [0, 0, 1, 0, 0, 1]
    assert float(mem_full) == 0.25


def test_subtract_reset_lif_surrogate_gradient_flows():
    neuron = SubtractResetLIF()
    current = torch.tensor([0.9, 1.1, 0.2], requires_grad=True)
    spike, _ = neuron(current, torch.zeros(3))
    spike.sum().backward()
    assert spike.tolist() == [0.0, 1.0, 0.0]
    assert current.grad is not None and bool((current.grad > 0).all())  # arctan surrogate is positive


def test_subtract_reset_lif_not_kept_in_snntorch_registry():
    before = list(snn.SpikingNeuron.instances)
    neurons = [SubtractResetLIF() for _ in range(5)]
    after = snn.SpikingNeuron.instances
    assert len(after) == len(before)
    assert not any(any(n is x for x in after) for n in neurons)
    # plain snnTorch neurons do register (the check above is not vacuous)
    leaky = snn.Leaky(beta=1.0)
    try:
        assert any(x is leaky for x in snn.SpikingNeuron.instances)
    finally:
        snn.SpikingNeuron.instances[:] = [x for x in snn.SpikingNeuron.instances if x is not leaky]


# --- ASR (Eqn 2) ---------------------------------------------------------------------------------

def test_asr_from_spikes_running_mean_for_if():
    spikes = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)
    assert asr_from_spikes(spikes).tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.75])


def test_asr_from_spikes_with_leak():
    # a[t] = Σ γ^{t-τ} s[τ] / Σ γ^{t-τ}, γ = 0.5: a1 = 1, a2 = 0.5 / 1.5, a3 = (0.25 + 1) / 1.75
    spikes = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    assert asr_from_spikes(spikes, leak=0.5).tolist() == pytest.approx([1.0, 1 / 3, 5 / 7], abs=1e-15)
    assert asr_weights(3, 0.5).tolist() == pytest.approx([1.0, 1.5, 1.75])
    assert asr_weights(4).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_asr_from_spikes_keeps_neuron_axes():
    spikes = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 1.0]]], dtype=F64)  # (T=3, 1, 2)
    asr = asr_from_spikes(spikes, leak=0.5)
    assert asr.shape == (3, 1, 2)
    assert asr[:, 0, 0].tolist() == pytest.approx([1.0, 1.0, 0.75 / 1.75])
    assert asr[:, 0, 1].tolist() == pytest.approx([0.0, 1 / 1.5, 1.5 / 1.75])


@pytest.mark.parametrize("T", [10, 37, 200])
@pytest.mark.parametrize("threshold", [1.0, 0.6])
def test_if_asr_converges_to_clipped_current_within_one_over_t(T, threshold):
    currents = torch.tensor([-2.0, -0.3, 0.0, 0.01, 0.123, 0.3, 0.5, 0.59, 0.6, 0.77, 0.999, 1.0, 1.3, 5.0],
                            dtype=F64)
    spikes, _ = if_scan(currents.expand(T, -1), threshold)
    asr = asr_from_spikes(spikes)[-1]
    target = steady_state(currents, threshold)
    assert target.tolist()[:3] == [0.0, 0.0, 0.0] and target.tolist()[-1] == 1.0
    assert float((asr - target).abs().max()) <= 1.0 / T + 1e-12


def test_steady_state_clips():
    assert steady_state(torch.tensor([-1.0, 0.25, 0.5, 2.0]), threshold=0.5).tolist() == [0.0, 0.5, 1.0, 1.0]


def test_non_dyadic_threshold_is_exact_in_float64():
    # float64 membrane of exactly 0.7 against V_th = 0.7 must not fire (a float32-rounded threshold,
    # 0.69999998..., would make it fire at t = 1).
    neuron = SubtractResetLIF(threshold=0.7).double()
    mem = torch.zeros(1, dtype=F64)
    out = []
    for c in (0.7, 0.7, 0.0):
        s, mem = neuron(torch.tensor([c], dtype=F64), mem)
        out.append((float(s), float(mem)))
    assert out == [(0.0, 0.7), (1.0, 0.7), (0.0, 0.7)]


def test_subtract_reset_lif_equals_if_step_in_float32():
    g = torch.Generator().manual_seed(3)
    currents = torch.randn(25, 4, 6, generator=g) * 1.5
    neuron = SubtractResetLIF(0.7, 0.9)
    mem_n = torch.zeros(4, 6)
    mem_s = torch.zeros(4, 6)
    for t in range(25):
        s_n, mem_n = neuron(currents[t], mem_n)
        s_s, mem_s = if_step(currents[t], mem_s, 0.7, 0.9)
        assert s_n.dtype == mem_n.dtype == torch.float32
        assert torch.equal(s_n, s_s) and torch.equal(mem_n, mem_s)


def test_initial_membrane_at_half_threshold_rounds_the_rate_instead_of_flooring_it():
    from spikingbert_sim.neurons import if_scan, initial_membrane

    T, threshold = 10, 0.8
    currents = torch.linspace(0.0, 0.8, 81, dtype=torch.float64)  # I / V_th from 0 to 1
    drive = currents.expand(T, -1)
    floor, _ = if_scan(drive, threshold, 1.0, initial_membrane(currents, threshold, 0.0))
    rounded, _ = if_scan(drive, threshold, 1.0, initial_membrane(currents, threshold, 0.5))
    exact = T * currents / threshold  # spikes an infinitely fine simulation would average to
    # U[0] = 0: count = ceil(T·I/V_th) - 1 (H(0) = 0), always below by up to one spike
    assert torch.all(floor.sum(0) <= exact + 1e-9) and torch.all(exact - floor.sum(0) <= 1 + 1e-9)
    # U[0] = V_th/2: within half a spike either way (T·I/V_th + 1/2 crossing rounds)
    assert torch.all((rounded.sum(0) - exact).abs() <= 0.5 + 1e-9)
    i = 26  # I = 0.26, I/V_th = 0.325: 3.25 spikes' worth
    assert (floor[:, i].sum(), rounded[:, i].sum()) == (3, 3)
    i = 30  # I/V_th = 0.375: 3.75 -> 3 from rest, 4 from half threshold
    assert (floor[:, i].sum(), rounded[:, i].sum()) == (3, 4)
    assert torch.equal(initial_membrane(currents, threshold, 0.5), torch.full_like(currents, 0.4))
