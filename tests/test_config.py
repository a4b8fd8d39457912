"""SpikingBertConfig: validation that names the field, JSON round trip, BERT conversion."""

import dataclasses

import pytest

from spikingbert_sim.config import SpikingBertConfig
from spikingbert_sim.errors import ConfigError

TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("hidden_size", -4), ("num_hidden_layers", 0), ("num_attention_heads", 1.5),
    ("intermediate_size", True), ("max_position_embeddings", "512"), ("type_vocab_size", 0),
    ("num_labels", 0), ("weight_mode", "int4"), ("threshold", 0.0), ("threshold", -1.0),
    ("leak", 0.0), ("leak", 1.5), ("layer_norm_eps", 0.0), ("quant_eps", -1e-5), ("pad_token_id", 40),
    ("pad_token_id", -1), ("initial_membrane", -0.1), ("initial_membrane", 1.0), ("initial_membrane", "half"),
])
def test_invalid_field_raises_config_error_naming_it(field, value):
    with pytest.raises(ConfigError) as info:
        SpikingBertConfig(**{**TINY, field: value})
    assert field in str(info.value)
    assert "\n" not in str(info.value)


def test_heads_must_divide_hidden_size():
    with pytest.raises(ConfigError, match="hidden_size.*num_attention_heads"):
        SpikingBertConfig(**{**TINY, "num_attention_heads": 3})


def test_label_names_must_match_num_labels():
    with pytest.raises(ConfigError, match="label_names"):
        SpikingBertConfig(**TINY, num_labels=3, label_names=("a", "b"))
    cfg = SpikingBertConfig(**TINY, num_labels=2, label_names=["neg", "pos"])
    assert cfg.label_names == ("neg", "pos")  # stored as a tuple (hashable, frozen)


def test_valid_edges_are_accepted():
    cfg = SpikingBertConfig(**TINY, leak=1.0, threshold=1e-3, num_labels=1, pad_token_id=39)
    assert cfg.is_regression and cfg.head_dim == 8


def test_config_is_frozen_and_replace_revalidates():
    cfg = SpikingBertConfig(**TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 32  # type: ignore[misc]
    assert cfg.replace(weight_mode="ternary").weight_mode == "ternary"
    with pytest.raises(ConfigError, match="leak"):
        cfg.replace(leak=2.0)


def test_json_round_trip():
    cfg = SpikingBertConfig(**TINY, weight_mode="binary", threshold=0.75, leak=0.9, num_labels=3,
                            label_names=("entailment", "neutral", "contradiction"), task="mnli", feedback=True)
    text = cfg.to_json()
    back = SpikingBertConfig.from_json(text)
    assert back == cfg
    assert back.label_names == ("entailment", "neutral", "contradiction")
    assert SpikingBertConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["label_names"] == ["entailment", "neutral", "contradiction"]


def test_unknown_fields_rejected_by_name():
    d = SpikingBertConfig(**TINY).to_dict()
    d["hidden_dropout_prob"] = 0.1
    d["zz_extra"] = 1
    with pytest.raises(ConfigError, match="hidden_dropout_prob, zz_extra"):
        SpikingBertConfig.from_dict(d)


def test_from_json_bad_input():
    with pytest.raises(ConfigError, match="not valid JSON"):
        SpikingBertConfig.from_json("{hidden_size: 3")
    with pytest.raises(ConfigError, match="mapping"):
        SpikingBertConfig.from_json("[1, 2]")
    with pytest.raises(ConfigError, match="hidden_size"):
        SpikingBertConfig.from_json('{"hidden_size": 0}')


def test_from_bert_config_copies_shape_fields():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=40, type_vocab_size=3,
                                   layer_norm_eps=1e-7, pad_token_id=1)
    cfg = SpikingBertConfig.from_bert_config(bert, num_hidden_layers=2, weight_mode="ternary")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (50, 32, 4, 64)
    assert (cfg.max_position_embeddings, cfg.type_vocab_size, cfg.layer_norm_eps, cfg.pad_token_id) == (40, 3, 1e-7, 1)
    assert cfg.num_hidden_layers == 2 and cfg.weight_mode == "ternary"


@pytest.mark.parametrize("field,value", [
    ("threshold", "1"), ("leak", None), ("layer_norm_eps", "x"), ("quant_eps", [1e-5]),
    ("pad_token_id", "0"), ("pad_token_id", 0.0), ("label_names", None), ("label_names", "ab"),
])
def test_wrong_types_raise_config_error_naming_the_field(field, value):
    # e.g. a JSON config with "threshold": "1" must not end in a bare TypeError
    with pytest.raises(ConfigError) as info:
        SpikingBertConfig(**{**TINY, field: value})
    assert field in str(info.value)
    with pytest.raises(ConfigError, match=field):
        SpikingBertConfig.from_dict({**TINY, field: value})


def test_initial_membrane_round_trips_and_its_default_is_left_out_of_files():
    half = SpikingBertConfig(**TINY, initial_membrane=0.5)
    assert SpikingBertConfig.from_json(half.to_json()) == half
    plain = SpikingBertConfig(**TINY).to_dict()
    assert "initial_membrane" not in plain  # files stay readable by versions without the field
    assert SpikingBertConfig.from_dict(plain).initial_membrane == 0.0
