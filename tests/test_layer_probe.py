"""examples/layer_probe.py: linear probes of a student's and a teacher's layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikingbert_sim.checkpoint import save_checkpoint
from spikingbert_sim.data import encode, load_glue
from spikingbert_sim.equilibrium import _embed, measure_equilibrium, steady_state_equilibrium
from spikingbert_sim.hf import convert_from_hf, tokenizer_to_meta
from spikingbert_sim.metrics import compute_metrics
from spikingbert_sim.teacher import load_teacher, teacher_logits

from _train_helpers import load_example, make_teacher, split_teacher_answers, write_sst2

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "layer_probe.py"


def test_ridge_probe_recovers_an_affine_map_and_shrinks_with_the_penalty():
    probe = load_example("layer_probe")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 3.0, 0.1, 2.0, 1.0, 5.0]) + 4.0
    w, b = torch.randn(6, 2, generator=g), torch.tensor([0.5, -1.5])
    x_eval = torch.randn(30, 6, generator=g)
    fit, pred = probe.ridge_probe(x, x @ w + b, x_eval, ridge=0.0)
    assert torch.allclose(fit, x @ w + b, atol=1e-4)
    assert torch.allclose(pred, x_eval @ w + b, atol=1e-4)  # standardization undone on new rows
    _, shrunk = probe.ridge_probe(x, x @ w + b, x_eval, ridge=10.0)
    centre = (x @ w + b).mean(0)  # the unpenalized bias keeps the mean; the slopes shrink towards it
    assert ((shrunk - centre).norm() < 0.5 * (pred - centre).norm())


def test_pool_reads_cls_and_the_mean_of_valid_tokens():
    probe = load_example("layer_probe")
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = probe.pool(h, mask)
    assert torch.equal(pooled["cls"], h[:, 0])
    assert torch.allclose(pooled["mean"][0], h[0, :2].mean(0))  # padding left out
    assert torch.allclose(pooled["mean"][1], h[1].mean(0))


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    data = write_sst2(tmp / "glue", n_train=24, n_dev=8)
    teacher_dir = make_teacher(tmp / "teacher", seed=2)
    split_teacher_answers(teacher_dir, load_glue("sst2", "train", data).text_a)  # not one answer for all
    teacher, tokenizer = load_teacher(teacher_dir, "sst2")
    student = convert_from_hf(str(teacher_dir), num_layers=2)
    ckpt = save_checkpoint(student, tmp / "student.pt", meta={"tokenizer": tokenizer_to_meta(tokenizer)})
    return data, teacher_dir, teacher, tokenizer, student, ckpt


@pytest.mark.parametrize("timesteps", [None, 6])
def test_layer_features_follow_row_order(probe_setup, timesteps):
    data, _, teacher, tokenizer, student, _ = probe_setup
    probe = load_example("layer_probe")
    tensors = encode(load_glue("sst2", "train", data, limit=10), tokenizer)
    feats, logits = probe.layer_features(student.eval(), teacher, tensors, timesteps, batch_size=4)
    assert torch.allclose(logits, teacher_logits(teacher, tensors, by_length=False), atol=1e-5)
    names = {name for name, _ in feats}
    assert names == {"embeddings", "layer.0.output", "layer.1.output"} | {f"teacher.{j}" for j in range(5)}
    for i in (0, 3, 7):  # one example alone, unpadded, gives the same row
        n = int(tensors["attention_mask"][i].sum())
        ids, mask, types = (tensors[k][i:i + 1, :n] for k in ("input_ids", "attention_mask", "token_type_ids"))
        with torch.no_grad():
            emb, bias = _embed(student, ids, mask, types)
            asr = (steady_state_equilibrium(student, emb, bias) if timesteps is None
                   else measure_equilibrium(student, emb, bias, timesteps))
        last = asr["layer.1.output"][0]
        assert torch.allclose(feats[("layer.1.output", "cls")][i], last[0], atol=1e-5)
        assert torch.allclose(feats[("layer.1.output", "mean")][i], last.mean(0), atol=1e-5)


def test_probe_report_and_command(probe_setup, tmp_path):
    data, teacher_dir, teacher, tokenizer, _, ckpt = probe_setup
    probe = load_example("layer_probe")
    report = probe.probe(ckpt, teacher_dir, "sst2", data, None, None, ridge=1e-9)
    train = encode(load_glue("sst2", "train", data), tokenizer)
    own = 100 * compute_metrics("sst2", teacher_logits(teacher, train).numpy(), train["labels"].numpy())["accuracy"]
    assert report["teacher_logits"]["train"] == pytest.approx(own, abs=0.01)
    assert own not in (0.0, 50.0, 100.0)  # mixed answers, right and wrong: a misfit probe scores otherwise
    assert report["train_rows"] == 24 and report["dev_rows"] == 8
    assert len(report["layers"]) == 2 * (3 + 5)
    rows = {(r["layer"], r["pool"]): r for r in report["layers"]}
    # a teacher layer has 32 real features for 24 rows: a probe with almost no penalty interpolates
    # the teacher's logits on its training rows and scores what the teacher scores there ([CLS] at
    # hidden state 0 is one vector for every row, so only its mean qualifies)
    interpolating = [("teacher.0", "mean")] + [(f"teacher.{j}", kind) for j in range(1, 5) for kind in ("cls", "mean")]
    for key in interpolating:
        assert rows[key]["train"] == pytest.approx(own, abs=0.01), key
    assert rows[("teacher.0", "cls")]["train"] != pytest.approx(own, abs=0.01)
    assert all(0 <= r["dev"] <= 100 and r["dev_metrics"] == {"accuracy": r["dev"]} for r in report["layers"])

    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(EXAMPLE), "--checkpoint", str(ckpt), "--teacher", str(teacher_dir),
                           "--task", "sst2", "--data", str(data), "--limit-train", "12", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["train_rows"] == 12
    bad = subprocess.run([sys.executable, str(EXAMPLE), "--checkpoint", str(tmp_path / "missing.pt"), "--teacher",
                          str(teacher_dir), "--task", "sst2", "--data", str(data)], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    wrong = subprocess.run([sys.executable, str(EXAMPLE), "--checkpoint", str(ckpt), "--teacher", str(teacher_dir),
                            "--task", "stsb", "--data", str(data)], capture_output=True, text=True)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
