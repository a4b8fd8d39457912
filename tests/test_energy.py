"""Operation counts and energy (SPEC §8), checked term by term against spikes counted independently."""

import pytest
import torch

from spikingbert_sim.energy import EnergyCosts, energy_report
from spikingbert_sim.neurons import if_scan
from spikingbert_sim.quantization import ternarize
from spikingbert_sim.simulation import simulate

T = 12
D, INTER = 16, 32


@pytest.fixture
def batch():
    ids = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # 6 + 4 = 10 valid tokens, 5 per sequence
    return ids, mask


def input_layer_spikes(model, ids, mask):
    """Spikes of the input layer over T steps and valid tokens, from the neuron equations directly."""
    with torch.no_grad():
        current = model.embeddings(ids)
    spikes, _ = if_scan(current.expand(T, *current.shape), model.config.threshold)
    return float((spikes * mask[None, :, :, None]).sum())


def test_fp_counts_by_hand(make_model, batch):
    model = make_model("fp").double()
    ids, mask = batch
    r = simulate(model, ids, mask, timesteps=T)
    rep = energy_report(model, r, num_sequences=2)
    layers = {l.name: l for l in rep.layers}
    assert len(rep.layers) == 2 * 8 + 1 and rep.layers[-1].name == "classifier"
    assert rep.timesteps == T and rep.tokens_per_sequence == 5.0

    s_emb = input_layer_spikes(model, ids, mask)
    assert s_emb == r.spike_counts["embeddings"] and s_emb > 0
    spn = s_emb / (10 * D)
    for proj in ("query", "key", "value"):  # each input spike fans out to D outputs: D accumulates
        q = layers[f"layer.0.{proj}"]
        assert q.input_site == "embeddings"
        assert q.accumulates == pytest.approx(s_emb / 2 * D)
        assert q.macs == 0.0 and q.integer_acs is False
        assert q.input_spikes_per_neuron == pytest.approx(spn)
        assert q.dense_ops == pytest.approx(5 * D * D)  # tokens × in × out MACs in the dense BERT
        assert q.normalized_ops == pytest.approx(spn * 5 * D * D)
        assert q.energy_pj == pytest.approx(q.accumulates * 0.9)  # fp32 add
        assert q.dense_energy_pj == pytest.approx(q.dense_ops * 4.6)  # fp32 MAC

    inter = layers["layer.1.intermediate"]  # fed by layer.1.attention_output, fan-out INTER
    assert inter.input_site == "layer.1.attention_output"
    assert inter.accumulates == pytest.approx(r.spike_counts["layer.1.attention_output"] / 2 * INTER)
    assert inter.dense_ops == pytest.approx(5 * D * INTER)
    out = layers["layer.0.output"]  # fed by the intermediate layer (width INTER), fan-out D
    assert out.accumulates == pytest.approx(r.spike_counts["layer.0.intermediate"] / 2 * D)
    assert layers["layer.1.query"].input_site == "layer.0.output"

    scores = layers["layer.0.attention_scores"]  # a key spike adds q to one score of each of 5 queries
    assert scores.accumulates == pytest.approx(r.spike_counts["layer.0.key"] / 2 * 5)
    assert scores.dense_ops == pytest.approx(5 * 5 * D)
    ctx = layers["layer.1.attention_context"]
    assert ctx.accumulates == pytest.approx(r.spike_counts["layer.1.value"] / 2 * 5)

    head = layers["classifier"]
    assert head.macs == D * 2 and head.accumulates == 0.0 and head.energy_pj == pytest.approx(D * 2 * 4.6)

    total = rep.total
    assert total["accumulates"] == pytest.approx(sum(l.accumulates for l in rep.layers))
    assert total["synaptic_ops"] == pytest.approx(total["accumulates"] + total["macs"])
    assert total["energy_ratio_spiking_to_dense"] == pytest.approx(total["energy_pj"] / total["dense_energy_pj"])
    d = rep.to_dict()
    assert set(d) == {"timesteps", "tokens_per_sequence", "total", "layers", "spikes_per_neuron"}
    assert d["layers"][0]["name"] == "layer.0.query"
    assert d["spikes_per_neuron"]["embeddings"] == pytest.approx(spn)


def test_ternary_counts_only_nonzero_weights_as_integer_adds(make_model, batch):
    model = make_model("ternary").double()
    ids, mask = batch
    r = simulate(model, ids, mask, timesteps=T)
    rep = energy_report(model, r, num_sequences=2)
    key = next(l for l in rep.layers if l.name == "layer.0.key")
    values, _ = ternarize(model.layers[0].key.weight.detach())
    nonzero = float((values != 0).double().mean())
    assert 0 < nonzero < 1
    s_emb = input_layer_spikes(model, ids, mask)
    assert key.accumulates == pytest.approx(s_emb / 2 * D * nonzero)
    assert key.integer_acs is True
    assert key.macs == pytest.approx(T * 5 * D)  # one rescaling multiply per output neuron per step
    assert key.energy_pj == pytest.approx(key.accumulates * 0.1 + key.macs * 4.6)
    # normalized OPS ignores the precision: spikes per neuron × dense operation count
    assert key.normalized_ops == pytest.approx(s_emb / (10 * D) * 5 * D * D)


def test_fp_vs_ternary_ratio_and_custom_costs(make_model, batch):
    ids, mask = batch
    reports = {}
    for mode in ("fp", "ternary"):
        model = make_model(mode).double()
        reports[mode] = energy_report(model, simulate(model, ids, mask, timesteps=T), 2).total
    ratio = reports["ternary"]["normalized_ops"] / reports["fp"]["normalized_ops"]
    assert 0.2 < ratio < 5
    # the dense baseline depends only on shapes, not on precision or spikes
    assert reports["ternary"]["dense_ops"] == reports["fp"]["dense_ops"]
    model = make_model("fp").double()
    r = simulate(model, ids, mask, timesteps=T)
    cheap = energy_report(model, r, 2, costs=EnergyCosts(mac_fp32=1.0, add_fp32=0.0)).total
    assert cheap["energy_pj"] == pytest.approx(cheap["macs"])  # only the classifier's MACs remain
