"""Simulation engines and recording: fast == reference bit for bit, recording is passive, traces agree."""

import numpy as np
import pytest
import torch

from spikingbert_sim.errors import ConfigError
from spikingbert_sim.neurons import asr_from_spikes, if_scan
from spikingbert_sim.simulation import RecordOptions, check_timesteps, settling_step, simulate

T = 16


def assert_same_result(a, b):
    assert torch.equal(a.logits, b.logits)
    assert a.asr.keys() == b.asr.keys()
    for site in a.asr:
        assert torch.equal(a.asr[site], b.asr[site]), site
        assert torch.equal(a.asr_trace[site], b.asr_trace[site]), site
    assert a.spike_counts == b.spike_counts


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_simulation_runs_in_eval_mode_and_restores_the_training_mode(make_model, batch, engine):
    """A model in training mode simulates as in eval mode (the same result), and each module's
    mode is what it was before, training or not."""
    model = make_model("ternary")
    ids, mask = batch
    seen = []  # the mode of the embeddings while the simulation runs them
    model.embeddings.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.eval()
    want = simulate(model, ids, mask, timesteps=6, engine=engine)
    assert not any(m.training for m in model.modules())
    model.train()
    got = simulate(model, ids, mask, timesteps=6, engine=engine)
    assert all(m.training for m in model.modules())
    assert torch.equal(got.logits, want.logits) and seen == [False, False]


@pytest.mark.parametrize("mode", ["fp", "binary", "ternary"])
def test_fast_engine_equals_reference_bitwise_float64(make_model, batch, mode):
    model = make_model(mode).double()
    ids, mask = batch
    fast = simulate(model, ids, mask, timesteps=T, engine="fast")
    ref = simulate(model, ids, mask, timesteps=T, engine="reference")
    assert_same_result(fast, ref)
    assert fast.logits.dtype == torch.float64
    # every site is active, so the equality is not between silent networks
    for site, trace in fast.asr_trace.items():
        assert 0.02 < float(trace[-1]) < 0.98, site


@pytest.mark.parametrize("overrides", [dict(leak=0.9), dict(threshold=0.7, leak=0.95)])
def test_fast_engine_equals_reference_with_leak_and_threshold(make_model, batch, overrides):
    model = make_model("ternary", **overrides).double()
    ids, mask = batch
    assert_same_result(simulate(model, ids, mask, timesteps=T, engine="fast"),
                       simulate(model, ids, mask, timesteps=T, engine="reference"))


def test_engines_agree_when_current_equals_a_non_dyadic_threshold(make_model, tiny_ids):
    # LayerNorm weight 0, bias 0.7: every input neuron gets exactly 0.7 = V_th. It must not fire at
    # t = 1 (strict threshold) and fires every step after: ASR (T-1)/T in both engines.
    model = make_model(threshold=0.7).double()
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.zero_()
        model.embeddings.LayerNorm.bias.fill_(0.7)
    for engine in ("fast", "reference"):
        r = simulate(model, tiny_ids, timesteps=8, engine=engine)
        assert r.asr_trace["embeddings"].tolist() == pytest.approx([0.0] + [(t - 1) / t for t in range(2, 9)])


def test_feedback_model_runs_on_reference_engine_for_both_names(make_model, tiny_ids):
    model = make_model(feedback=True).double()
    with torch.no_grad():
        model.feedback.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    a = simulate(model, tiny_ids, timesteps=T, engine="fast")  # falls back to the reference engine
    b = simulate(model, tiny_ids, timesteps=T, engine="reference")
    assert_same_result(a, b)
    # the feedback changes the input layer's activity (it is not ignored)
    plain = make_model().double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("feedback")})
    c = simulate(plain, tiny_ids, timesteps=T)
    assert not torch.equal(a.asr["embeddings"], c.asr["embeddings"])


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_recording_does_not_change_results(make_model, batch, engine):
    model = make_model("binary")
    ids, mask = batch
    plain = simulate(model, ids, mask, timesteps=T, engine=engine)
    record = RecordOptions(per_neuron=True, raster_sites=tuple(model.site_names()), raster_sequences=(0, 2),
                           raster_tokens=(0, 3, 5), raster_neurons=8)
    recorded = simulate(model, ids, mask, timesteps=T, engine=engine, record=record)
    assert_same_result(plain, recorded)
    assert set(recorded.neuron_asr_trace) == set(model.site_names())
    assert set(recorded.rasters) == set(model.site_names())
    assert plain.rasters == {} and plain.neuron_asr_trace == {}


@pytest.mark.parametrize("leak", [1.0, 0.8])
def test_mean_trace_is_mean_of_per_neuron_asr_over_valid_tokens(make_model, batch, leak):
    model = make_model(leak=leak).double()
    ids, mask = batch
    r = simulate(model, ids, mask, timesteps=T, record=RecordOptions(per_neuron=True))
    valid = mask.bool()
    for site in model.site_names():
        per_neuron = r.neuron_asr_trace[site]  # (T, B, L, W)
        assert per_neuron.shape == (T, 3, 7, model.site_width(site))
        assert torch.equal(per_neuron[-1], r.asr[site])
        want_trace = per_neuron[:, valid, :].mean(dim=(1, 2))  # (T,)
        assert torch.allclose(r.asr_trace[site], want_trace, atol=1e-12), site
        # including the padding tokens would give another value (the test can tell them apart)
        assert not torch.allclose(per_neuron[-1].mean(), want_trace[-1], atol=1e-6)
        assert r.neuron_counts[site] == 18 * model.site_width(site)
        if leak == 1.0:  # IF: total valid spikes = T × final mean ASR × valid neurons
            assert r.spike_counts[site] == pytest.approx(T * float(want_trace[-1]) * 18 * model.site_width(site))


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_raster_holds_the_spikes_behind_the_asr(make_model, batch, engine):
    model = make_model()
    ids, mask = batch
    site = "layer.0.attention"
    record = RecordOptions(per_neuron=True, sites=(site,), raster_sites=(site, "layer.1.output"),
                           raster_sequences=(0, 2, 9), raster_tokens=(1, 3), raster_neurons=(0, 5, 11, 99))
    r = simulate(model, ids, mask, timesteps=T, engine=engine, record=record)
    raster = r.rasters[site]
    assert raster.dtype == torch.uint8
    assert raster.shape == (T, 2, 2, 3)  # out-of-range sequence 9 and neuron 99 dropped
    assert r.raster_index[site] == ((0, 2), (1, 3), (0, 5, 11))
    assert set(raster.unique().tolist()) <= {0, 1} and int(raster.sum()) > 0
    per_neuron = r.neuron_asr_trace[site][:, [0, 2]][:, :, [1, 3]][..., [0, 5, 11]]
    assert torch.allclose(asr_from_spikes(raster.float()), per_neuron.float(), atol=1e-6)
    assert set(r.neuron_asr_trace) == {site}
    # int raster_neurons keeps the first N
    r2 = simulate(model, ids, mask, timesteps=4, record=RecordOptions(raster_sites=(site,), raster_neurons=3))
    assert r2.rasters[site].shape == (4, 1, 1, 3) and r2.raster_index[site] == ((0,), (0,), (0, 1, 2))


def test_input_layer_spikes_equal_if_scan_of_embeddings(make_model, tiny_ids):
    model = make_model().double()
    r = simulate(model, tiny_ids, timesteps=T, record=RecordOptions(raster_sites=("embeddings",),
                                                                   raster_sequences=(0, 1),
                                                                   raster_tokens=tuple(range(6)),
                                                                   raster_neurons=16))
    with torch.no_grad():
        current = model.embeddings(tiny_ids)
    spikes, _ = if_scan(current.expand(T, *current.shape), 1.0)
    assert torch.equal(r.rasters["embeddings"], spikes.to(torch.uint8))
    assert r.spike_counts["embeddings"] == float(spikes.sum())


def test_unknown_record_site_rejected(make_model, tiny_ids):
    with pytest.raises(ConfigError, match="layer.7.key"):
        simulate(make_model(), tiny_ids, timesteps=2, record=RecordOptions(raster_sites=("layer.7.key",)))


def test_settling_step_on_hand_traces():
    # |a - a[T]| > tol at indices 0 and 2 -> settles at t = 4 (1-based)
    assert settling_step(np.array([0.0, 0.5, 0.52, 0.5, 0.5]), tol=0.01) == 4
    assert settling_step([0.3, 0.3, 0.3]) == 1
    # a distance exactly equal to tol counts as settled
    assert settling_step([0.0, 0.75, 1.0], tol=0.25) == 2
    assert settling_step([0.0, 0.7, 1.0], tol=0.25) == 3
    assert settling_step(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.0]), tol=0.1) == 6
    assert settling_step([0.42]) == 1


def test_result_settling_steps_and_spikes_per_neuron(make_model, tiny_ids):
    r = simulate(make_model(), tiny_ids, timesteps=T)
    steps = r.settling_steps(0.05)
    assert steps == {s: settling_step(t, 0.05) for s, t in r.asr_trace.items()}
    spn = r.spikes_per_neuron()
    assert spn["embeddings"] == pytest.approx(r.spike_counts["embeddings"] / (12 * 16))
    # IF neurons: spikes per neuron over T steps = T × final mean ASR
    assert spn["layer.0.key"] == pytest.approx(T * float(r.asr_trace["layer.0.key"][-1]))
    assert r.total_spikes() == pytest.approx(sum(r.spike_counts.values()))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "a", True, None, 2.0])
def test_check_timesteps_rejects(bad):
    with pytest.raises(ConfigError, match="timesteps"):
        check_timesteps(bad)


def test_check_timesteps_accepts_integers():
    assert check_timesteps(3) == 3
    assert check_timesteps(np.int64(5)) == 5 and type(check_timesteps(np.int64(5))) is int


def test_simulate_validates_inputs(make_model, tiny_ids):
    model = make_model()
    with pytest.raises(ConfigError, match="engine"):
        simulate(model, tiny_ids, timesteps=2, engine="warp")
    with pytest.raises(ConfigError, match="input_ids"):
        simulate(model, tiny_ids[0], timesteps=2)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        simulate(model, torch.ones(1, 33, dtype=torch.long), timesteps=2)
    with pytest.raises(ConfigError, match="attention_mask"):
        simulate(model, tiny_ids, torch.ones(2, 5, dtype=torch.long), timesteps=2)
    with pytest.raises(ConfigError, match="timesteps"):
        simulate(model, tiny_ids, timesteps=0)
