"""The spiking BERT (SPEC §3): shapes, site names, attention mask, save/load round trip."""

import pytest
import torch
import torch.nn.functional as F

from spikingbert_sim.model import SpikingBertForSequenceClassification, attention_mask_bias
from spikingbert_sim.quantization import QuantLinear
from spikingbert_sim.simulation import simulate

T = 12


def test_site_names_in_firing_order(make_model):
    model = make_model()
    per_layer = ["key", "value", "attention", "attention_output", "intermediate", "output"]
    assert model.site_names() == ["embeddings"] + [f"layer.{i}.{s}" for i in range(2) for s in per_layer]
    assert model.layer_output_sites() == ["embeddings", "layer.0.output", "layer.1.output"]
    assert model.output_site == "layer.1.output"
    assert model.site_width("layer.0.intermediate") == 32
    assert model.site_width("layer.1.key") == 16


@pytest.mark.parametrize("num_labels", [1, 2, 3])
def test_logits_shape_and_loss(make_model, tiny_ids, num_labels):
    model = make_model(num_labels=num_labels)
    if num_labels == 1:
        labels = torch.tensor([0.5, 3.0])
    else:
        labels = torch.tensor([0, num_labels - 1])
    out = model(tiny_ids, labels=labels, timesteps=T)
    assert out.logits.shape == (2, num_labels)
    want = (F.mse_loss(out.logits.squeeze(-1), labels) if num_labels == 1
            else F.cross_entropy(out.logits, labels))
    assert torch.allclose(out.loss, want)
    assert out.result.timesteps == T
    preds = out.result.predictions()
    assert preds.shape == (2,)
    if num_labels == 1:
        assert torch.equal(preds, out.logits[:, 0])
    else:
        assert torch.equal(preds, out.logits.argmax(-1))


def test_logits_are_classifier_of_final_cls_asr(make_model, tiny_ids):
    model = make_model()
    r = simulate(model, tiny_ids, timesteps=T)
    cls = r.asr["layer.1.output"][:, 0, :]  # (B, D)
    assert torch.allclose(r.logits, model.classifier(cls))
    # the ASR is a rate: a multiple of 1/T in [0, 1]
    assert torch.allclose(cls * T, (cls * T).round(), atol=1e-5)
    assert 0 < float(cls.mean()) < 1


def test_attention_mask_bias():
    bias = attention_mask_bias(torch.tensor([[1, 1, 0]]), torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, :2].tolist() == [0.0, 0.0]
    assert float(bias[0, 0, 0, 2]) == torch.finfo(torch.float32).min


def test_padding_tokens_do_not_change_cls_output(make_model):
    model = make_model().double()
    g = torch.Generator().manual_seed(3)
    real = torch.randint(5, 40, (5,), generator=g)
    # two sequences: the same 5 real tokens, then 3 padding positions holding different token ids
    ids = torch.stack([torch.cat([real, torch.tensor([0, 0, 0])]),
                       torch.cat([real, torch.tensor([7, 19, 33])])])
    mask = torch.tensor([[1] * 5 + [0] * 3] * 2)
    r = simulate(model, ids, mask, timesteps=T)
    assert torch.equal(r.logits[0], r.logits[1])
    assert torch.equal(r.asr["layer.1.output"][0, :5], r.asr["layer.1.output"][1, :5])
    # ... and the same as the unpadded sequence alone
    alone = simulate(model, real[None], timesteps=T)
    assert torch.allclose(alone.logits[0], r.logits[1], atol=1e-12)
    # the mask matters: attending to the padding positions changes the output
    unmasked = simulate(model, ids, torch.ones_like(mask), timesteps=T)
    assert not torch.equal(unmasked.asr["layer.1.output"][0, :5], unmasked.asr["layer.1.output"][1, :5])


def test_token_type_ids_change_the_input_current(make_model, tiny_ids):
    model = make_model()
    a = simulate(model, tiny_ids, timesteps=T)
    b = simulate(model, tiny_ids, token_type_ids=torch.ones_like(tiny_ids), timesteps=T)
    assert not torch.equal(a.asr["embeddings"], b.asr["embeddings"])


def test_embeddings_match_bert_definition(make_model, tiny_ids):
    model = make_model()
    e = model.embeddings
    positions = torch.arange(tiny_ids.shape[1])
    want = F.layer_norm(e.word_embeddings(tiny_ids) + e.position_embeddings(positions)[None]
                        + e.token_type_embeddings(torch.zeros_like(tiny_ids)), (16,),
                        e.LayerNorm.weight, e.LayerNorm.bias, e.LayerNorm.eps)
    assert torch.allclose(e(tiny_ids), want, atol=1e-6)


def test_quantized_model_uses_quant_linear_everywhere_but_head(make_model):
    model = make_model("ternary")
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 2 * 6  # Q, K, V, attention output, intermediate, output per layer
    assert all(m.mode == "ternary" for m in model.modules() if isinstance(m, QuantLinear))
    assert not isinstance(model.classifier, QuantLinear)
    model.freeze_quantized()
    assert all(m.frozen for m in model.modules() if isinstance(m, QuantLinear))


def test_simulation_restores_training_mode(make_model, tiny_ids):
    model = make_model().train()
    simulate(model, tiny_ids, timesteps=2)
    assert model.training


@pytest.mark.parametrize("mode", ["fp", "binary", "ternary"])
def test_save_pretrained_from_pretrained_round_trip(make_model, tiny_ids, tmp_path, mode):
    model = make_model(mode, num_labels=3, label_names=("x", "y", "z"), task="mnli")
    path = tmp_path / "m.pt"
    model.save_pretrained(path, note="hello")
    loaded = SpikingBertForSequenceClassification.from_pretrained(path)
    assert loaded.config == model.config
    a = simulate(model, tiny_ids, timesteps=T)
    b = simulate(loaded, tiny_ids, timesteps=T)
    assert torch.equal(a.logits, b.logits)
    for site in model.site_names():
        assert torch.equal(a.asr[site], b.asr[site])
    if mode != "fp":
        assert all(m.frozen for m in loaded.modules() if isinstance(m, QuantLinear))
