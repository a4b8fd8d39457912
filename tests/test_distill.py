"""Distillation losses on hand-computed cases, the layer map and projections, and the teacher's
targets (hidden states and pre-softmax attention scores, always in eval mode)."""

import math

import pytest
import torch

from spikingbert_sim.distill import (Distiller, attention_mse, default_layer_map, label_loss, masked_mse,
                                     parse_layer_map, prediction_loss, soft_cross_entropy)
from spikingbert_sim.errors import ConfigError
from spikingbert_sim.teacher import teacher_forward

from _train_helpers import tiny_bert_config


def test_default_layer_map_is_evenly_spaced_and_ends_on_the_last_layer():
    assert default_layer_map(4, 6) == [2, 3, 4, 6]  # round(1.5) = 2, round(4.5) = 4 (half to even)
    assert default_layer_map(2, 4) == [2, 4]
    assert default_layer_map(3, 12) == [4, 8, 12]
    assert default_layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert parse_layer_map("1, 3,6", 3, 6) == [1, 3, 6]
    # A student deeper than its teacher: early layers match the embeddings (hidden state 0) and
    # have no teacher attention to match.
    assert default_layer_map(5, 2) == [0, 1, 1, 2, 2]
    deep = Distiller(8, 8, num_student=5, num_teacher=2, attention=True)
    assert deep.hidden_targets["layer.0.output"] == 0
    assert "layer.0.attention_scores" not in deep.attention_targets
    assert deep.teacher_attention_layers == [0, 1]
    with pytest.raises(ConfigError, match="2 entries but the student has 3"):
        parse_layer_map("1,2", 3, 6)
    with pytest.raises(ConfigError, match="teacher hidden states 0..6"):
        parse_layer_map("1,2,7", 3, 6)
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_layer_map("a,b,c", 3, 6)


def test_masked_mse_ignores_padding_tokens():
    p = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2); token 2 is padding
    t = torch.tensor([[[0.0, 0.0], [3.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # valid squared errors: 1, 4, 0, 4 -> 9 over 2 tokens x 2 features
    assert float(masked_mse(p, t, mask)) == pytest.approx(9 / 4)
    assert float(masked_mse(p, t, torch.ones(1, 3))) == pytest.approx((9 + 2 * 100 ** 2) / 6)


def test_attention_mse_counts_pairs_of_valid_tokens():
    s = torch.zeros(1, 2, 3, 3)
    t = torch.zeros(1, 2, 3, 3)
    t[0, 0, 0, 1] = 2.0  # valid pair (0, 1), head 0
    t[0, 1, 1, 1] = 1.0  # valid pair (1, 1), head 1
    t[0, 0, 2, 0] = 50.0  # query is padding: ignored
    t[0, 1, 0, 2] = 50.0  # key is padding: ignored
    mask = torch.tensor([[1, 1, 0]])
    # (4 + 1) over 2 heads x 2 x 2 valid pairs
    assert float(attention_mse(s, t, mask)) == pytest.approx(5 / 8)


def test_soft_cross_entropy_by_hand_with_temperature():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    tau = 2.0

    def by_hand(si, ti):
        pt = [math.exp(x / tau) for x in ti]
        pt = [x / sum(pt) for x in pt]
        z = math.log(sum(math.exp(x / tau) for x in si))
        return -sum(p * (x / tau - z) for p, x in zip(pt, si))

    expected = (by_hand([1, 2], [3, 1]) + by_hand([0, 0], [1, -1])) / 2
    assert float(soft_cross_entropy(s, t, tau)) == pytest.approx(expected, rel=1e-6)
    assert float(prediction_loss(s, t, tau)) == pytest.approx(expected, rel=1e-6)
    # Equal distributions: the loss is the teacher's entropy, here log 2 for uniform targets.
    assert float(soft_cross_entropy(torch.zeros(1, 2), torch.zeros(1, 2))) == pytest.approx(math.log(2))
    with pytest.raises(ConfigError, match="temperature"):
        soft_cross_entropy(s, t, 0.0)


def test_regression_and_label_losses():
    s = torch.tensor([[1.0], [2.0], [4.0]])
    t = torch.tensor([[1.5], [2.0], [3.0]])
    assert float(prediction_loss(s, t, regression=True)) == pytest.approx((0.25 + 0 + 1) / 3)
    assert float(label_loss(s, torch.tensor([1.0, 1.0, 1.0]), regression=True)) == pytest.approx((0 + 1 + 9) / 3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    assert float(label_loss(logits, torch.tensor([0, 0]))) == pytest.approx(expected, rel=1e-6)


def test_distiller_projections_and_intermediate_loss_by_hand():
    d = Distiller(4, 4, num_student=2, num_teacher=4)
    assert d.layer_map == [2, 4]
    assert d.hidden_targets == {"embeddings": 0, "layer.0.output": 2, "layer.1.output": 4}
    assert torch.equal(d.projections["layer_0_output"].weight, torch.eye(4))
    assert torch.equal(d.projections["layer_0_output"].bias, torch.zeros(4))
    assert d.teacher_attention_layers == []  # attention matching off
    g = torch.Generator().manual_seed(0)
    student = {s: torch.rand(2, 3, 4, generator=g) for s in d.student_sites}
    teacher = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(5))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss = d.intermediate_loss(student, teacher, mask)
    expected = sum(masked_mse(student[s], teacher[j], mask) for s, j in d.hidden_targets.items())
    assert float(loss.total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert set(loss.hidden) == set(d.student_sites) and loss.attention == {}
    loss.total.backward()
    assert d.projections["embeddings"].weight.grad is not None

    wide = Distiller(4, 6, num_student=2, num_teacher=4, layer_map=[1, 3], attention=True)
    assert wide.projections["embeddings"].weight.shape == (6, 4)
    assert wide.attention_targets == {"layer.0.attention_scores": 0, "layer.1.attention_scores": 2}
    assert wide.teacher_attention_layers == [0, 2]
    student_scores = {f"layer.{i}.attention_scores": torch.zeros(2, 2, 3, 3) for i in range(2)}
    teacher_scores = {0: torch.ones(2, 2, 3, 3), 2: torch.ones(2, 2, 3, 3) * 2}
    teacher6 = tuple(torch.zeros(2, 3, 6) for _ in range(5))
    out = wide.intermediate_loss({s: torch.zeros(2, 3, 4) for s in wide.student_sites}, teacher6, mask,
                                 student_scores, teacher_scores)
    assert out.attention == pytest.approx({"layer.0.attention_scores": 1.0, "layer.1.attention_scores": 4.0})
    bad = {0: torch.ones(2, 4, 3, 3), 2: torch.ones(2, 4, 3, 3)}
    with pytest.raises(ConfigError, match="same number of heads"):
        wide.intermediate_loss({s: torch.zeros(2, 3, 4) for s in wide.student_sites}, teacher6, mask,
                               student_scores, bad)


def test_teacher_targets_are_eval_mode_and_scores_are_pre_softmax():
    import transformers

    cfg = tiny_bert_config(layers=3)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.3  # dropout would change every output
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(cfg).eval()
    # An eager-attention twin returns the attention probabilities to check the scores against.
    cfg_eager = tiny_bert_config(layers=3)
    cfg_eager._attn_implementation = "eager"
    eager = transformers.BertForSequenceClassification(cfg_eager)
    eager.load_state_dict(teacher.state_dict())
    eager.eval()
    ids = torch.randint(5, cfg.vocab_size, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    types = torch.zeros_like(ids)
    teacher.train()  # teacher_forward must switch to eval itself
    out = teacher_forward(teacher, ids, mask, types, attention_layers=[0, 2])
    assert not teacher.training
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True,
                    output_attentions=True)
    assert len(out.hidden_states) == 4
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert sorted(out.attention_scores) == [0, 2]
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for j in (0, 2):
        scores = out.attention_scores[j]
        assert scores.shape == (2, cfg.num_attention_heads, 6, 6)
        torch.testing.assert_close(torch.softmax(scores + bias, -1), ref.attentions[j], rtol=1e-5, atol=1e-6)
