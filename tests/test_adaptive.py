"""The head after every step (logits traces) and adaptive early stopping."""

from __future__ import annotations

import pytest
import torch

from spikingbert_sim.errors import ConfigError
from spikingbert_sim.simulation import AdaptiveOptions, RecordOptions, simulate


def _ids(B=3, L=7, seed=3, vocab=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one padded sequence
    return ids, mask


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("mode,readout", [("fp", "cls"), ("ternary", "cls"), ("fp", "mean"), ("ternary", "mean")])
def test_logits_trace_equals_fixed_timestep_runs(make_model, engine, mode, readout):
    model = make_model(mode, num_labels=2, readout=readout).double()
    ids, mask = _ids()
    full = simulate(model, ids, mask, timesteps=12, engine=engine, record=RecordOptions(logits_trace=True))
    assert full.logits_trace.shape == (12, 3, 2)
    assert torch.equal(full.logits_trace[-1], full.logits)
    for T in (1, 2, 5, 11):  # causal: a T-step run's logits are the trace's T-th entry, bit for bit
        assert torch.equal(simulate(model, ids, mask, timesteps=T, engine=engine).logits, full.logits_trace[T - 1])
    # the trace moves (it is not one value repeated)
    assert (full.logits_trace[0] - full.logits_trace[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("readout", ["cls", "mean"])
def test_adaptive_stop_equals_a_fixed_run_of_that_length(make_model, readout):
    model = make_model("ternary", num_labels=2, readout=readout).double()
    ids, mask = _ids()
    loose = AdaptiveOptions(window=4, asr_tol=1.0, min_steps=4, check_every=2)
    r = simulate(model, ids, mask, timesteps=40, adaptive=loose, record=RecordOptions(logits_trace=True))
    # asr_tol 1.0 never binds: the stop is the first check where no prediction moved for 4 steps
    classes = r.logits_trace.argmax(-1)  # (t, B)
    t = r.timesteps
    # checks at even steps once a window and its start exist (t >= 5)
    assert r.stopped_early and r.max_timesteps == 40 and t % 2 == 0 and t >= 6
    assert bool((classes[t - 4:t] == classes[t - 1]).all())
    for earlier in range(6, t, 2):  # no earlier check passed
        assert not bool((classes[earlier - 4:earlier] == classes[earlier - 1]).all())
    fixed = simulate(model, ids, mask, timesteps=t)
    assert torch.equal(fixed.logits, r.logits)
    for site in model.site_names():
        assert torch.equal(fixed.asr[site], r.asr[site])
        assert torch.equal(fixed.asr_trace[site], r.asr_trace[site])
        assert fixed.spike_counts[site] == r.spike_counts[site]
    ref = simulate(model, ids, mask, timesteps=40, adaptive=loose, engine="reference")
    assert ref.timesteps == t and torch.equal(ref.logits, r.logits)


def test_adaptive_tolerances_bind(make_model):
    model = make_model("fp", num_labels=2).double()
    ids, mask = _ids()
    never = AdaptiveOptions(window=4, asr_tol=0.0, min_steps=4, check_every=2)
    r = simulate(model, ids, mask, timesteps=30, adaptive=never)
    assert r.timesteps == 30 and not r.stopped_early  # no ASR is exactly still: runs to the end
    strict = simulate(model, ids, mask, timesteps=200, adaptive=AdaptiveOptions(asr_tol=0.005, window=8))
    loose = simulate(model, ids, mask, timesteps=200, adaptive=AdaptiveOptions(asr_tol=0.05, window=8))
    assert loose.timesteps < strict.timesteps


def test_adaptive_regression_head_uses_value_spread(make_model):
    model = make_model("fp", num_labels=1).double()
    ids, mask = _ids()
    opts = AdaptiveOptions(window=4, asr_tol=1.0, value_tol=0.02, min_steps=4, check_every=1)
    r = simulate(model, ids, mask, timesteps=200, adaptive=opts, record=RecordOptions(logits_trace=True))
    v = r.logits_trace[..., 0]
    t = r.timesteps
    assert 5 < t < 200
    assert bool(((v[t - 4:t].amax(0) - v[t - 4:t].amin(0)) <= 0.02).all())
    assert not bool(((v[t - 5:t - 1].amax(0) - v[t - 5:t - 1].amin(0)) <= 0.02).all())


@pytest.mark.parametrize("field,value", [("window", 0), ("check_every", -1), ("min_steps", 1.5),
                                         ("asr_tol", -0.1)])
def test_adaptive_options_are_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        AdaptiveOptions(**{field: value})
