"""runner: texts and task data to inputs, batched simulation, summaries, traces.npz files."""

import json

import numpy as np
import pytest
import torch

from spikingbert_sim.errors import ConfigError, DataError
from spikingbert_sim.runner import (Inputs, load_traces, merge_results, save_traces, simulate_inputs, summarize,
                                    task_inputs, texts_to_inputs, tokenize)
from spikingbert_sim.simulation import RecordOptions, SimulationResult, settling_step

T = 10
TEXTS = ["the film is good", "a bad plot", "very very awful acting", "great", "not a good movie at all"]


def test_texts_to_inputs_single_and_pairs():
    single = texts_to_inputs(["a", "b", "c"])
    assert single.text_a == ["a", "b", "c"] and single.text_b is None and len(single) == 3
    pairs = texts_to_inputs(["a1", "b1", "a2", "b2"], pairs=True)
    assert pairs.text_a == ["a1", "a2"] and pairs.text_b == ["b1", "b2"]


@pytest.mark.parametrize("texts,pairs,match", [
    ([], False, "no input"), (["ok", "  "], False, "number 2 is empty"), (["a", "b", "c"], True, "even number"),
])
def test_texts_to_inputs_errors(texts, pairs, match):
    with pytest.raises(ConfigError, match=match):
        texts_to_inputs(texts, pairs=pairs)


def test_task_inputs_from_tsv(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood film \t1\nbad \t0\nok \t1\n")
    inputs = task_inputs("sst2", str(tmp_path), limit=2)
    assert inputs.text_a == ["good film ", "bad "] and inputs.text_b is None
    assert inputs.labels == [1, 0] and inputs.task == "sst2"
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood film \t1\n")
    with pytest.raises(DataError):
        task_inputs("sst2", str(tmp_path), limit=0)


def test_tokenize_pads_to_longest(tiny_tokenizer):
    enc = tokenize(tiny_tokenizer, Inputs(text_a=["good", "a bad plot"], text_b=["film", "x"]))
    assert enc["input_ids"].shape == enc["attention_mask"].shape == enc["token_type_ids"].shape
    assert enc["input_ids"].shape == (2, 7)  # [CLS] a bad plot [SEP] [UNK] [SEP]
    assert enc["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert enc["token_type_ids"][1].tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_batched_simulation_equals_one_batch(make_model, tiny_tokenizer):
    model = make_model()
    inputs = Inputs(text_a=TEXTS)
    record = RecordOptions(per_neuron=True, sites=("layer.1.output",), raster_sites=("layer.0.key",))
    one = simulate_inputs(model, tiny_tokenizer, inputs, T, batch_size=8, record=record)
    many = simulate_inputs(model, tiny_tokenizer, inputs, T, batch_size=2, record=record)
    assert one.logits.shape == many.logits.shape == (5, 2)
    assert torch.allclose(one.logits, many.logits, atol=1e-6)
    for site in model.site_names():
        assert many.neuron_counts[site] == one.neuron_counts[site]
        assert many.spike_counts[site] == pytest.approx(one.spike_counts[site])
        assert torch.allclose(many.asr_trace[site], one.asr_trace[site], atol=1e-9), site
        assert torch.allclose(many.asr[site], one.asr[site])
    assert many.neuron_asr_trace["layer.1.output"].shape == one.neuron_asr_trace["layer.1.output"].shape
    assert many.rasters["layer.0.key"].shape == (T, 1, 1, 16)  # rasters of the first batch only


def test_simulate_inputs_errors(make_model, tiny_tokenizer):
    model = make_model(vocab_size=20)  # the tokenizer's ids go up to 39
    with pytest.raises(ConfigError, match="vocabulary"):
        simulate_inputs(model, tiny_tokenizer, Inputs(text_a=["w19"]), T)
    with pytest.raises(ConfigError, match="batch size"):
        simulate_inputs(make_model(), tiny_tokenizer, Inputs(text_a=["a"]), T, batch_size=0)


def _result(trace, counts, spikes, logits):
    return SimulationResult(logits=torch.tensor(logits), timesteps=len(trace), leak=1.0,
                            asr={"s": torch.zeros(len(logits), 1, 1)}, asr_trace={"s": torch.tensor(trace)},
                            spike_counts={"s": spikes}, neuron_counts={"s": counts})


def test_merge_results_weights_traces_by_valid_neurons():
    a = _result([0.0, 0.5], 10, 5.0, [[1.0, 0.0]])
    b = _result([1.0, 0.2], 30, 8.0, [[0.0, 1.0], [2.0, 2.0]])
    m = merge_results([a, b])
    assert m.asr_trace["s"].tolist() == pytest.approx([0.75, 0.275])  # (10·a + 30·b) / 40
    assert m.neuron_counts == {"s": 40} and m.spike_counts == {"s": 13.0}
    assert m.logits.tolist() == [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]
    assert m.asr["s"].shape == (3, 1, 1)
    assert merge_results([a]) is a


def test_summarize_classification_with_metrics(make_model, tiny_tokenizer):
    model = make_model(label_names=("negative", "positive"))
    inputs = Inputs(text_a=TEXTS[:4], labels=[1, 0, 0, 1], task="sst2")
    r = simulate_inputs(model, tiny_tokenizer, inputs, T)
    s = summarize(r, model, inputs, settle_tol=0.05, extra={"engine": "fast"})
    assert s["timesteps"] == T and s["num_inputs"] == 4 and s["weight_mode"] == "fp" and s["engine"] == "fast"
    assert set(s["layers"]) == set(model.site_names())
    for site, row in s["layers"].items():
        assert row["final_asr"] == pytest.approx(float(r.asr_trace[site][-1]), abs=1e-6)
        assert row["settled_at"] == settling_step(r.asr_trace[site], 0.05)
        assert row["spikes_per_neuron"] == pytest.approx(r.spikes_per_neuron()[site], abs=1e-6)
    preds = r.logits.argmax(-1).tolist()
    for i, p in enumerate(s["predictions"]):
        assert p["prediction"] == preds[i] and p["label"] == ("negative", "positive")[preds[i]]
        assert p["probability"] == pytest.approx(float(torch.softmax(r.logits[i], -1).max()), abs=1e-6)
        assert p["gold"] == inputs.labels[i] and p["text"] == TEXTS[i]
    want_acc = float(np.mean(np.array(preds) == np.array(inputs.labels)))
    assert s["metrics"] == {"accuracy": pytest.approx(want_acc)}
    assert s["total_spikes"] == pytest.approx(r.total_spikes())
    json.dumps(s)  # JSON-serialisable


def test_summarize_regression(make_model, tiny_tokenizer):
    model = make_model(num_labels=1)
    inputs = Inputs(text_a=["a", "b"], text_b=["good", "bad"])
    r = simulate_inputs(model, tiny_tokenizer, inputs, T)
    s = summarize(r, model, inputs)
    assert [p["prediction"] for p in s["predictions"]] == pytest.approx(r.logits[:, 0].tolist())
    assert s["predictions"][1]["text_b"] == "bad"
    assert "label" not in s["predictions"][0] and "metrics" not in s


def test_traces_round_trip(make_model, tiny_tokenizer, tmp_path):
    model = make_model()
    record = RecordOptions(per_neuron=True, sites=("embeddings",), raster_sites=("layer.1.output",),
                           raster_neurons=5)
    r = simulate_inputs(model, tiny_tokenizer, Inputs(text_a=TEXTS[:2]), T, record=record)
    path = save_traces(tmp_path / "sub" / "traces.npz", r, meta={"label": "fp"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["traces.npz"]
    tr = load_traces(path)
    assert list(tr.asr) == model.site_names()  # site order kept
    for site in model.site_names():
        assert tr.asr[site].shape == (T,)
        assert np.array_equal(tr.asr[site], r.asr_trace[site].numpy())
        assert tr.spikes[site].tolist() == [r.spike_counts[site], r.neuron_counts[site]]
    assert np.array_equal(tr.rasters["layer.1.output"], r.rasters["layer.1.output"].numpy())
    assert tr.asr_neuron["embeddings"].shape == (T, 2, r.asr["embeddings"].shape[1], 16)
    assert tr.meta["label"] == "fp" and tr.meta["timesteps"] == T
    assert tr.meta["raster_index"]["layer.1.output"] == [[0], [0], [0, 1, 2, 3, 4]]


def test_load_traces_errors(tmp_path):
    with pytest.raises(DataError, match="no such traces file"):
        load_traces(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="not a readable traces"):
        load_traces(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(DataError, match="no ASR traces"):
        load_traces(other)


def test_load_traces_truncated_or_malformed(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **{"asr/embeddings": np.zeros(3), "meta": np.asarray("{}")})
    data = good.read_bytes()
    cases = {"truncated.npz": data[: len(data) // 2],  # zipfile.BadZipFile inside numpy
             "tail_cut.npz": data[:-30]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    np.savez(tmp_path / "objects.npz", **{"asr/x": np.array([{"a": 1}], dtype=object), "meta": np.asarray("{}")})
    np.savez(tmp_path / "meta_list.npz", **{"asr/x": np.zeros(3), "meta": np.asarray("[1]")})
    np.savez(tmp_path / "meta_bad.npz", **{"asr/x": np.zeros(3), "meta": np.asarray("{bad")})
    for name in [*cases, "objects.npz", "meta_list.npz", "meta_bad.npz"]:
        with pytest.raises(DataError) as info:
            load_traces(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    assert load_traces(good).asr["embeddings"].tolist() == [0.0, 0.0, 0.0]
