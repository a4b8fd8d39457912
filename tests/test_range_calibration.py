"""examples/range_calibration.py: a converted student whose analog rates are affine codes of the teacher's values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikingbert_sim.checkpoint import load_checkpoint
from spikingbert_sim.data import encode, load_glue
from spikingbert_sim.equilibrium import _embed, steady_state_equilibrium
from spikingbert_sim.evaluation import trim_batch
from spikingbert_sim.hf import convert_from_hf
from spikingbert_sim.teacher import load_teacher, teacher_logits

from _train_helpers import load_example, make_teacher, split_teacher_answers, write_sst2

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "range_calibration.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    data = write_sst2(tmp / "glue", n_train=24, n_dev=8)
    teacher_dir = make_teacher(tmp / "teacher", seed=2)
    split_teacher_answers(teacher_dir, load_glue("sst2", "train", data).text_a)
    teacher, tokenizer = load_teacher(teacher_dir, "sst2")
    tensors = trim_batch(encode(load_glue("sst2", "train", data), tokenizer), "cpu")
    return data, teacher_dir, teacher, tensors


def test_analog_rates_are_the_affine_codes_of_the_teachers_values(setup):
    _, _, teacher, tensors = setup
    calib = load_example("range_calibration")
    bert = teacher.bert
    activity = calib.teacher_activity(bert, tensors, 2)
    model = convert_from_hf(teacher, num_layers=2)
    # quantiles 0 and 100 of the very rows measured: no value of layer 0 leaves [0, 1], so up to its
    # attention output (before the GELU, which the code only approximates) the rates are exact
    calib.calibrate(model, bert, activity, quantiles=(0.0, 100.0))
    with torch.no_grad():
        emb, bias = _embed(model, tensors["input_ids"], tensors["attention_mask"], tensors["token_type_ids"])
        asr = steady_state_equilibrium(model.eval(), emb, bias)
    mask = tensors["attention_mask"].bool()
    g = torch.Generator().manual_seed(0)
    for site, name, per_feature in (("embeddings", "E", False), ("layer.0.key", "0.k", True),
                                    ("layer.0.value", "0.v", True), ("layer.0.attention_output", "0.so", False)):
        s, c = calib.affine_code(activity[name], (0.0, 100.0), None, per_feature, g)
        expected = s * activity[name] + c
        assert expected.min() >= -1e-5 and expected.max() <= 1 + 1e-5
        assert torch.allclose(asr[site][mask], expected, atol=2e-4), site
    # the plain conversion is far from it: negative values are cut off
    plain = convert_from_hf(teacher, num_layers=2).eval()
    with torch.no_grad():
        plain_asr = steady_state_equilibrium(plain, *_embed(plain, tensors["input_ids"], tensors["attention_mask"],
                                                            tensors["token_type_ids"]))
    assert (plain_asr["embeddings"][mask] == 0).float().mean() > 0.3


def test_shift_keeps_the_scale_and_centres_each_median():
    calib = load_example("range_calibration")
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1001, 3) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 3.0, -1.0])
    s, c = calib.affine_code(values, (1.0, 99.0), 0.4, True, g)
    assert torch.equal(s, torch.ones(3))
    assert torch.allclose((values * s + c).median(0).values, torch.full((3,), 0.4), atol=1e-6)
    s, c = calib.affine_code(values, (0.0, 100.0), None, False, g)  # one pair for every feature
    coded = values * s + c
    assert float(coded.min()) == pytest.approx(0.0, abs=1e-6) and float(coded.max()) == pytest.approx(1.0, abs=1e-6)


def test_fitted_head_is_the_ridge_regression_on_the_rows_in_order(setup):
    _, _, teacher, tensors = setup
    calib = load_example("range_calibration")
    model = convert_from_hf(teacher, num_layers=2)
    calib.calibrate(model, teacher.bert, calib.teacher_activity(teacher.bert, tensors, 2))
    model.eval()
    calib.fit_head(model, teacher, tensors, ridge=0.5)
    with torch.no_grad():
        emb, bias = _embed(model, tensors["input_ids"], tensors["attention_mask"], tensors["token_type_ids"])
        rates = steady_state_equilibrium(model, emb, bias)[model.output_site][:, 0].double()
    a = torch.cat([rates, torch.ones(len(rates), 1, dtype=torch.float64)], 1)
    target = teacher_logits(teacher, tensors, by_length=False).double()
    w = torch.linalg.solve(a.T @ a + 0.5 * torch.eye(a.shape[1], dtype=torch.float64), a.T @ target)
    assert torch.allclose(model.classifier.weight.double(), w[:-1].T, atol=1e-4)
    assert torch.allclose(model.classifier.bias.double(), w[-1], atol=1e-4)


def test_command(setup, tmp_path):
    data, teacher_dir, teacher, tensors = setup
    out = tmp_path / "calibrated.pt"
    done = subprocess.run([sys.executable, str(EXAMPLE), "--teacher", str(teacher_dir), "--task", "sst2", "--data",
                           str(data), "--layers", "2", "--rows", "16", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = load_checkpoint(out)
    assert loaded.model.config.num_hidden_layers == 2 and loaded.meta["task"] == "sst2"
    # the head is fitted, not the teacher's classifier copied by the plain conversion
    assert not torch.allclose(loaded.model.classifier.weight, teacher.classifier.weight)
    bad = subprocess.run([sys.executable, str(EXAMPLE), "--teacher", str(teacher_dir), "--task", "sst2", "--data",
                          str(data), "--quantiles", "90", "10", "--out", str(tmp_path / "x.pt")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "error: --quantiles" in bad.stderr and not (tmp_path / "x.pt").exists()
    deep = subprocess.run([sys.executable, str(EXAMPLE), "--teacher", str(teacher_dir), "--task", "sst2", "--data",
                           str(data), "--layers", "9", "--out", str(tmp_path / "y.pt")], capture_output=True, text=True)
    assert deep.returncode != 0 and deep.stderr.startswith("error:") and "Traceback" not in deep.stderr
    spiking = subprocess.run([sys.executable, str(EXAMPLE), "--teacher", str(out), "--task", "sst2", "--data",
                              str(data), "--out", str(tmp_path / "z.pt")], capture_output=True, text=True)
    assert spiking.returncode != 0 and "not a fine-tuned BERT folder" in spiking.stderr
