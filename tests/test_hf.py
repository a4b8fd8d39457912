"""Hugging Face interop: convert a tiny BERT layer by layer, tokenizers stored in checkpoint meta."""

import pytest
import torch
import transformers

from spikingbert_sim.errors import ConfigError
from spikingbert_sim.hf import (convert_from_hf, evenly_spaced, load_bert, load_tokenizer, tokenizer_from_meta,
                                tokenizer_to_meta)
from spikingbert_sim.quantization import binarize, ternarize
from spikingbert_sim.simulation import simulate

PAIRS = [  # (spiking layer attribute, path inside a transformers BertLayer)
    ("query", "attention.self.query"), ("key", "attention.self.key"), ("value", "attention.self.value"),
    ("attention_output", "attention.output.dense"), ("attention_norm", "attention.output.LayerNorm"),
    ("intermediate", "intermediate.dense"), ("output", "output.dense"), ("output_norm", "output.LayerNorm"),
]


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    return transformers.BertForSequenceClassification.from_pretrained(tiny_hf_dir).eval()


def assert_layer_copied(spiking_layer, bert_layer):
    for ours, theirs in PAIRS:
        dst, src = getattr(spiking_layer, ours), bert_layer.get_submodule(theirs)
        assert torch.equal(dst.weight, src.weight), ours
        assert torch.equal(dst.bias, src.bias), ours


def test_convert_copies_chosen_layers_embeddings_and_head(tiny_hf_dir, hf_model):
    model = convert_from_hf(str(tiny_hf_dir), layer_indices=[0, 2])
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 32, 4, 64)
    assert cfg.vocab_size == hf_model.config.vocab_size and cfg.num_labels == 3
    bert = hf_model.bert
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert torch.equal(getattr(model.embeddings, name).weight, getattr(bert.embeddings, name).weight), name
    assert torch.equal(model.embeddings.LayerNorm.weight, bert.embeddings.LayerNorm.weight)
    assert torch.equal(model.embeddings.LayerNorm.bias, bert.embeddings.LayerNorm.bias)
    assert_layer_copied(model.layers[0], bert.encoder.layer[0])
    assert_layer_copied(model.layers[1], bert.encoder.layer[2])
    # layer 1 of the BERT was skipped: its weights are not in the spiking layer 1
    assert not torch.equal(model.layers[1].query.weight, bert.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(model.classifier.weight, hf_model.classifier.weight)
    assert torch.equal(model.classifier.bias, hf_model.classifier.bias)


def test_convert_default_takes_first_layers(hf_model):
    model = convert_from_hf(hf_model, num_layers=2)
    assert model.config.num_hidden_layers == 2
    assert_layer_copied(model.layers[0], hf_model.bert.encoder.layer[0])
    assert_layer_copied(model.layers[1], hf_model.bert.encoder.layer[1])


def test_convert_head_not_copied_when_label_count_differs(hf_model):
    model = convert_from_hf(hf_model, num_layers=1, num_labels=2)
    assert model.config.num_labels == 2 and model.classifier.weight.shape == (2, 32)


def test_convert_plain_bert_model_defaults_to_two_labels(hf_model):
    plain = hf_model.bert
    model = convert_from_hf(plain, num_layers=3)
    assert model.config.num_labels == 2
    assert_layer_copied(model.layers[2], plain.encoder.layer[2])


@pytest.mark.parametrize("mode,quantizer", [("binary", binarize), ("ternary", ternarize)])
def test_convert_quantized_modes_use_copied_weights_as_latent(hf_model, mode, quantizer):
    model = convert_from_hf(hf_model, layer_indices=[1], weight_mode=mode, threshold=0.5)
    assert model.config.weight_mode == mode and model.config.threshold == 0.5
    src = hf_model.bert.encoder.layer[1]
    assert_layer_copied(model.layers[0], src)  # latent weights are the BERT's
    values, scale = model.layers[0].intermediate.quantized()
    want_values, want_scale = quantizer(src.intermediate.dense.weight.detach())
    assert torch.equal(values, want_values) and torch.equal(scale, want_scale)
    assert model.layers[0].intermediate.mode == mode


def test_converted_model_simulates(hf_model, tiny_tokenizer):
    model = convert_from_hf(hf_model, num_layers=2)
    enc = tiny_tokenizer(["the film is good", "a bad plot"], padding=True, return_tensors="pt")
    r = simulate(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], timesteps=8)
    assert r.logits.shape == (2, 3) and torch.isfinite(r.logits).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=4), "cannot take 4 layers"),
    (dict(layer_indices=[0, 3]), r"\[0, 3\)"),
    (dict(layer_indices=[-1]), "layer indices"),
    (dict(layer_indices=[]), "layer indices"),
])
def test_convert_rejects_impossible_layer_choices(hf_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        convert_from_hf(hf_model, **kwargs)


def test_load_bert_from_folder_and_errors(tiny_hf_dir, tmp_path):
    assert isinstance(load_bert(str(tiny_hf_dir)), transformers.BertForSequenceClassification)
    with pytest.raises(ConfigError, match="cannot load a BERT") as info:
        load_bert(str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)
    other = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(other)
    with pytest.raises(ConfigError, match="only BERT models convert"):
        load_bert(str(other))


def test_evenly_spaced():
    assert evenly_spaced(4, 12) == [2, 5, 8, 11]
    assert evenly_spaced(3, 3) == [0, 1, 2]
    assert evenly_spaced(2, 3) == [1, 2]
    assert evenly_spaced(1, 6) == [5]


def test_tokenizer_round_trip_through_meta(tiny_hf_dir, tiny_tokenizer):
    tok = load_tokenizer(str(tiny_hf_dir))
    meta = tokenizer_to_meta(tok)
    assert meta["do_lower_case"] is True
    assert meta["vocab"].split("\n")[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    back = tokenizer_from_meta({"tokenizer": meta})
    for args in (("The FILM is very good w3",), ("a plot", "not great")):
        assert back(*args)["input_ids"] == tiny_tokenizer(*args)["input_ids"]
        assert back(*args)["token_type_ids"] == tiny_tokenizer(*args)["token_type_ids"]
    assert back("zzz unknownword")["input_ids"] == [2, 1, 1, 3]


def test_tokenizer_meta_keeps_case_sensitivity():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "Film", "film"]
    cased = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False)
    meta = tokenizer_to_meta(cased)
    assert meta["do_lower_case"] is False
    back = tokenizer_from_meta({"tokenizer": meta})
    assert back("Film film")["input_ids"] == [2, 4, 5, 3]


def test_tokenizer_from_meta_absent_or_malformed():
    assert tokenizer_from_meta({}) is None
    with pytest.raises(ConfigError, match="malformed"):
        tokenizer_from_meta({"tokenizer": {"vocab": 5}})
    with pytest.raises(ConfigError, match="malformed"):
        tokenizer_from_meta({"tokenizer": "a\nb"})


def test_load_tokenizer_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))
