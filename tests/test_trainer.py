"""The training loop: stages, files, checkpoints loadable for simulation, learning, refusals, and a
SIGKILL-and-resume run that reproduces the uninterrupted run bit for bit."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spikingbert_sim.checkpoint import load_checkpoint, safe_torch_load
from spikingbert_sim.errors import ConfigError
from spikingbert_sim.trainer import TrainConfig, evaluate_student, train

from _train_helpers import make_teacher, write_sst2, write_stsb


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    data = write_sst2(root / "glue", n_train=48, n_dev=16)
    write_stsb(data)
    return {"teacher": str(make_teacher(root / "teacher")), "stsb_teacher": str(make_teacher(root / "stsb_teacher", num_labels=1)),
            "data": str(data), "root": root}


def config(assets, out, **kw):
    base = dict(task="sst2", out=str(out), data_dir=assets["data"], teacher=assets["teacher"], weights="ternary",
                timesteps=4, stage="all", max_steps=3, batch_size=8, lr=1e-3, device="cpu", layers=2)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def test_all_stages_write_metrics_and_loadable_checkpoints(assets, tmp_path):
    out = tmp_path / "run"
    result = train(config(assets, out, eval_every=2), progress=False)
    assert result.global_step == 9
    records = read_metrics(out)
    # eval every 2 global steps, plus every stage end (steps 3, 6, 9)
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8, 9]
    assert [r["stage"] for r in records] == ["kd", "kd", "predict", "predict", "finetune", "finetune"]
    assert set(records[0]["kd_hidden"]) == {"embeddings", "layer.0.output", "layer.1.output"}
    assert set(records[0]["kd_attention"]) == {"layer.0.attention_scores", "layer.1.attention_scores"}
    assert all("accuracy" in r["dev"] and r["train_loss"] > 0 for r in records)
    assert records[-1]["lr"] == 0.0  # linear decay ends at 0

    last = load_checkpoint(out / "last.pt")  # what `spikesim run` / `eval` do
    best = load_checkpoint(out / "best.pt")
    assert last.model.config.weight_mode == "ternary" and last.model.config.task == "sst2"
    assert last.model.config.label_names == ("negative", "positive")
    assert not any(getattr(m, "frozen", False) for m in last.model.modules())  # latent weights kept
    assert any(getattr(m, "frozen", False) for m in best.model.modules())  # packed for inference
    assert last.meta["tokenizer"]["vocab"].startswith("[PAD]")
    training = safe_torch_load(out / "last.pt")["training"]
    assert training["progress"]["done"] and training["progress"]["global_step"] == 9

    # best.pt is the model that was evaluated: re-scoring it gives the recorded metric.
    best_record = max((r for r in records if r["best"]), key=lambda r: r["step"])
    assert best.meta["step"] == best_record["step"]
    from spikingbert_sim.data import GlueDataset, load_glue
    from spikingbert_sim.hf import tokenizer_from_meta

    dev = GlueDataset.from_split(load_glue("sst2", "dev", assets["data"]), tokenizer_from_meta(best.meta)).tensors
    metrics, _ = evaluate_student(best.model, "sst2", dev, 4, 8, "cpu")
    assert metrics == best_record["dev"]


def test_training_learns_with_equilibrium_gradients(assets, tmp_path):
    # Train and dev are the same 16 sentences: fitting them shows the gradients point downhill.
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=16, seed=5)
    (data / "SST-2" / "dev.tsv").write_text((data / "SST-2" / "train.tsv").read_text())
    out = tmp_path / "run"
    result = train(config(assets, out, data_dir=str(data), stage="finetune", weights="fp", timesteps=32,
                          max_steps=40, batch_size=16, lr=3e-3, warmup_ratio=0.0, eval_every=40), progress=False)
    records = read_metrics(out)
    assert records[-1]["dev"]["accuracy"] >= 0.8, records
    assert result.best_metric >= 0.8


@pytest.mark.parametrize("method", ["equilibrium", "bptt"])
def test_stsb_regression_with_feedback_student(assets, tmp_path, method):
    out = tmp_path / method
    train(config(assets, out, task="stsb", teacher=assets["stsb_teacher"], stage="predict", feedback=True,
                 method=method, max_steps=2, solver="broyden"), progress=False)
    (record,) = read_metrics(out)
    assert set(record["dev"]) == {"pearson", "spearman", "combined"}
    if method == "equilibrium":
        assert record["solver"]["solver"] == "broyden" and record["solver"]["steps"] >= 1
    else:
        assert "solver" not in record
    model = load_checkpoint(out / "last.pt").model
    assert model.feedback is not None and model.config.num_labels == 1


def test_init_random_and_from_a_checkpoint_without_teacher(assets, tmp_path):
    from spikingbert_sim.checkpoint import save_checkpoint

    train(config(assets, tmp_path / "random", init="random", stage="kd", max_steps=1, attention_kd=False),
          progress=False)
    start = load_checkpoint(tmp_path / "random" / "last.pt")
    save_checkpoint(start.model, tmp_path / "init.pt", meta=start.meta, packed=False)
    out = tmp_path / "from_ckpt"
    train(config(assets, out, init=str(tmp_path / "init.pt"), teacher=None, stage="finetune", max_steps=2,
                 weights="binary"), progress=False)
    model = load_checkpoint(out / "last.pt").model
    assert model.config.weight_mode == "binary"
    with pytest.raises(ConfigError, match="needs a teacher"):
        config(assets, tmp_path / "x", teacher=None, stage="kd")
    # A packed (shipped) checkpoint continues training from latent weights that quantize back to it:
    # after one step at a negligible learning rate every layer still holds the packed values and scale.
    packed = start.model.freeze_quantized()
    save_checkpoint(packed, tmp_path / "packed.pt", meta=start.meta)
    out = tmp_path / "from_packed"
    train(config(assets, out, init=str(tmp_path / "packed.pt"), teacher=None, stage="finetune", max_steps=1,
                 lr=1e-12), progress=False)
    resumed = dict(load_checkpoint(out / "last.pt").model.named_modules())
    frozen = [(name, m) for name, m in packed.named_modules() if getattr(m, "frozen", False)]
    assert len(frozen) == 2 * 6
    for name, module in frozen:
        values, scale = resumed[name].quantized()
        assert torch.equal(values, module.qweight.float()), name
        assert torch.allclose(scale, module.scale, rtol=1e-5, atol=0), name


def test_refusals_leave_existing_checkpoints_untouched(assets, tmp_path):
    out = tmp_path / "run"
    cfg = config(assets, out, stage="finetune", max_steps=2)
    train(cfg, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        train(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"another configuration \(lr 0.001 there vs 0.002 here\)"):
        train(config(assets, out, stage="finetune", max_steps=2, lr=2e-3), resume=True, progress=False)
    with pytest.raises(ConfigError, match="another configuration"):
        train(config(assets, out, stage="finetune", max_steps=2, limit=40), resume=True, progress=False)
    # A finished run resumes to itself; run-only options (evaluation cadence) may change.
    result = train(config(assets, out, stage="finetune", max_steps=2, eval_every=1), resume=True, progress=False)
    assert result.global_step == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --resume on an empty folder starts a fresh run.
    fresh = train(config(assets, tmp_path / "fresh", stage="finetune", max_steps=1), resume=True, progress=False)
    assert fresh.global_step == 1


def _cli(assets, out, *extra):
    return [sys.executable, "-c", "from spikingbert_sim.cli import main; main()", "train", "--task", "sst2", "--data", assets["data"],
            "--teacher", assets["teacher"], "--out", str(out), "--weights", "ternary", "--timesteps", "4",
            "--stage", "all", "--max-steps", "10", "--batch-size", "8", "--layers", "2", "--lr", "1e-3",
            "--eval-every", "2", "--device", "cpu", "--no-progress", *extra]


def test_sigkill_and_resume_reproduces_the_uninterrupted_run_bitwise(assets, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = subprocess.Popen(_cli(assets, full), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_cli(assets, cut), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (cut / "last.pt").exists():
        assert victim.poll() is None, victim.communicate()[1].decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(0.05)  # let it take a few more steps, maybe into a write
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = safe_torch_load(cut / "last.pt")["training"]["progress"]
    assert not killed_at["done"], "the run finished before it could be killed; the test proves nothing"
    assert uninterrupted.wait(timeout=180) == 0, uninterrupted.communicate()[1].decode()[-2000:]
    resumed = subprocess.run(_cli(assets, cut, "--resume"), env=env, capture_output=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]

    a, b = safe_torch_load(full / "last.pt"), safe_torch_load(cut / "last.pt")
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name
    assert a["training"]["progress"] == b["training"]["progress"]
    ba, bb = safe_torch_load(full / "best.pt"), safe_torch_load(cut / "best.pt")
    assert all(torch.equal(ba["state"][k], bb["state"][k]) for k in ba["state"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(read_metrics(full)) == strip(read_metrics(cut))
    assert len(read_metrics(full)) == 15  # 30 steps, every 2nd


def test_progress_lines_every_n_steps_without_bars(assets, tmp_path):
    lines = []
    train(config(assets, tmp_path / "run", stage="predict", max_steps=6, eval_every=100, log_every=2),
          progress=False, log=lines.append)
    progress = [line for line in lines if "s/step" in line]
    # steps 2, 4, 6 of the 6-step stage; each line's loss is the mean over the steps since the previous line
    assert [line.split(" [")[0] for line in progress] == ["step 2", "step 4", "step 6"]
    assert all(f"[predict {s}/6]" in line for s, line in zip((2, 4, 6), progress))
    assert progress[-1].endswith("0 s left in the stage")
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in progress]
    assert all(v > 0 for v in losses)


def test_progress_lines_default_off_with_bars_and_zero_means_never(assets, tmp_path):
    lines = []
    train(config(assets, tmp_path / "a", stage="predict", max_steps=3, log_every=0), progress=False, log=lines.append)
    assert not any("s/step" in line for line in lines)
    with pytest.raises(ConfigError, match="log_every"):
        config(assets, tmp_path / "b", log_every=-1)


def test_progress_log_keeps_paused_time_out_of_seconds_per_step(monkeypatch):
    from spikingbert_sim import trainer as trainer_module

    clock = iter([0.0, 5.0, 105.0, 112.0, 112.0])  # start; a 100 s pause from 5 s to 105 s; step 2 ends at 112 s
    monkeypatch.setattr(trainer_module.time, "time", lambda: next(clock))
    lines = []
    log = trainer_module.ProgressLog(2, 6, lines.append, " in the stage")
    log.step(1, 1.0, "s1")
    log.pause()
    log.resume()
    log.step(2, 3.0, "s2")  # 12 s of steps over 2 steps, 4 steps left
    assert lines == ["s2 loss 2.0000, 6.00 s/step, 24 s left in the stage"]
    assert trainer_module.log_interval(None, bars=True) == 0
    assert trainer_module.log_interval(None, bars=False) == trainer_module.DEFAULT_LOG_EVERY
    assert trainer_module.log_interval(7, bars=True) == 7


def test_duration_text():
    from spikingbert_sim.trainer import _duration

    assert _duration(3725) == "1 h 02 min"
    assert _duration(95) == "1 min 35 s"
    assert _duration(4.4) == "4 s"


def test_progress_seconds_per_step_leave_out_evaluation(assets, tmp_path, monkeypatch):
    from spikingbert_sim import trainer as trainer_module

    evaluate = trainer_module.Trainer._evaluate

    def slow_evaluate(self):
        time.sleep(1.5)
        return evaluate(self)

    monkeypatch.setattr(trainer_module.Trainer, "_evaluate", slow_evaluate)
    lines = []
    train(config(assets, tmp_path / "run", stage="predict", max_steps=4, eval_every=1, log_every=2),
          progress=False, log=lines.append)
    per_step = [float(line.split(", ")[1].split(" s/step")[0]) for line in lines if "s/step" in line]
    assert len(per_step) == 2 and max(per_step) < 1.0  # a 1.5 s evaluation after every step is not counted


def _write_cola(root: Path, n: int) -> None:
    """``root/CoLA/{train,dev}.tsv``: no header; source, label, original label, sentence."""
    import random as _random

    from _train_helpers import sentence

    rng = _random.Random(3)
    (root / "CoLA").mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        rows = [f"gj04\t{i % 2}\t\t{sentence(rng, i % 2)} zzcola" for i in range(n)]
        (root / "CoLA" / name).write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_transfer_set_feeds_kd_and_predict_but_not_finetune(assets, tmp_path):
    from spikingbert_sim.trainer import Trainer

    data = write_sst2(tmp_path / "glue", n_train=48, n_dev=16)
    _write_cola(data, 20)
    # epoch-based budget: kd and predict take ceil((48 + 20) / 8) = 9 steps, finetune ceil(48 / 8) = 6
    out = tmp_path / "run"
    cfg = config(assets, out, data_dir=str(data), max_steps=None, epochs=1, transfer=("cola",), eval_every=100)
    train(cfg, progress=False)
    records = read_metrics(out)
    assert [(r["stage"], r["stage_step"]) for r in records] == [("kd", 9), ("predict", 9), ("finetune", 6)]

    trainer = Trainer(dataclasses.replace(cfg, out=str(tmp_path / "inspect")))
    trainer.setup()
    kd_rows = trainer.stage_tensors("kd")
    assert trainer.stage_tensors("predict") is kd_rows and "labels" not in kd_rows
    assert kd_rows["input_ids"].shape[0] == 68
    assert torch.equal(kd_rows["input_ids"][:48], trainer.train_tensors["input_ids"])  # the task's own inputs first
    unk = trainer.tokenizer.convert_tokens_to_ids("[UNK]")  # every CoLA line ends in an unknown word
    assert bool((kd_rows["input_ids"][48:] == unk).any(dim=1).all())
    assert not bool((kd_rows["input_ids"][:48] == unk).any())
    assert trainer.stage_tensors("finetune")["input_ids"].shape[0] == 48

    # another transfer set is another run; without --transfer the fingerprint is the old one
    with pytest.raises(ConfigError, match="another configuration"):
        train(config(assets, out, data_dir=str(data), max_steps=None, epochs=1, eval_every=100),
              resume=True, progress=False)
    plain = Trainer(config(assets, tmp_path / "plain", data_dir=str(data)))
    plain.setup()
    assert "transfer" not in plain.fingerprint_config and plain.transfer_tensors is None


@pytest.mark.parametrize("task, transfer, message", [
    ("sst2", ("stsb",), "takes single sentences, stsb does not"),
    ("stsb", ("sst2",), "takes sentence pairs, sst2 does not"),
    ("sst2", ("sst-2",), "listed twice or the task itself"),
    ("stsb", ("rte", "RTE"), "listed twice"),
    ("sst2", ("imdb",), "unknown task 'imdb'"),
])
def test_transfer_refusals(assets, tmp_path, task, transfer, message):
    from spikingbert_sim.errors import DataError

    with pytest.raises((ConfigError, DataError), match=message):
        config(assets, tmp_path / "x", task=task, transfer=transfer)


def test_spiking_checkpoint_as_teacher(assets, tmp_path):
    """A full-precision spiking student teaches students of its own architecture: its analog-
    equilibrium ASRs stand for hidden states, and a copy of it (``--init teacher``) fits them exactly."""
    from spikingbert_sim.distill import Distiller
    from spikingbert_sim.equilibrium import steady_state_forward
    from spikingbert_sim.model import INPUT_SITE
    from spikingbert_sim.teacher import load_teacher, teacher_forward
    from spikingbert_sim.trainer import Trainer

    parent = tmp_path / "fp"
    train(config(assets, parent, weights="fp", stage="kd", max_steps=2), progress=False)
    teacher_file = str(parent / "last.pt")
    teacher, tokenizer = load_teacher(teacher_file, "sst2")
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert tokenizer.convert_tokens_to_ids("[PAD]") == 0

    batch = tokenizer(["good film", "the plot was very dull"], padding=True, return_tensors="pt")
    t = teacher_forward(teacher, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                        attention_layers=(0, 1))
    ref = steady_state_forward(load_checkpoint(teacher_file).model, batch["input_ids"], batch["attention_mask"],
                               batch["token_type_ids"], sites=[INPUT_SITE, "layer.0.output", "layer.1.output"],
                               attention_scores=True)
    assert len(t.hidden_states) == 3
    assert torch.equal(t.hidden_states[0], ref.asr[INPUT_SITE])
    assert torch.equal(t.hidden_states[2], ref.asr["layer.1.output"])
    assert torch.equal(t.attention_scores[1], ref.attention_scores["layer.1.attention_scores"])
    assert torch.equal(t.logits, ref.logits)
    assert 0.0 < float(t.hidden_states[1].mean()) < 1.0  # rates, not LayerNorm outputs
    distiller = Distiller(32, 32, 2, 2, attention=True)
    assert distiller.layer_map == [1, 2]
    loss = distiller.intermediate_loss(ref.asr, t.hidden_states, batch["attention_mask"], ref.attention_scores,
                                       t.attention_scores)
    assert float(loss.total.detach()) == 0.0  # the same network, identity projections

    # Training at the analog equilibrium (the teacher's): an fp copy of the teacher starts at zero kd loss
    # and, at a negligible rate, stays there; a ternary copy starts from the teacher's weights ternarized
    # and pays their quantization error.
    out = tmp_path / "fp-copy"
    train(config(assets, out, teacher=teacher_file, weights="fp", stage="kd", max_steps=2, lr=1e-12,
                 method="steady_state"), progress=False)
    (record,) = read_metrics(out)
    assert record["train_loss"] < 1e-12
    assert set(record["kd_hidden"]) == {"embeddings", "layer.0.output", "layer.1.output"}
    out = tmp_path / "ternary"
    train(config(assets, out, teacher=teacher_file, weights="ternary", stage="all", max_steps=1, lr=1e-12,
                 method="steady_state"), progress=False)
    records = read_metrics(out)
    assert [r["stage"] for r in records] == ["kd", "predict", "finetune"]
    assert records[0]["train_loss"] > 1e-4  # quantization error
    student = load_checkpoint(out / "last.pt").model
    parent_state = load_checkpoint(teacher_file).model.state_dict()
    w = parent_state["layers.0.key.weight"]
    values, scale = student.get_submodule("layers.0.key").quantized()
    gamma = w.abs().mean()
    assert torch.equal(values, torch.round(torch.clamp(w / (gamma + 1e-5), -1, 1)))

    trainer = Trainer(config(assets, tmp_path / "inspect", teacher=teacher_file))
    trainer.setup()
    assert trainer.teacher_id and trainer.layer_map == [1, 2]


def test_spiking_teacher_refusals(assets, tmp_path):
    from spikingbert_sim.errors import CheckpointError

    train(config(assets, tmp_path / "stsb", task="stsb", teacher=assets["stsb_teacher"], weights="fp", stage="kd",
                 max_steps=1), progress=False)
    with pytest.raises(ConfigError, match="trained on stsb, not sst2"):
        train(config(assets, tmp_path / "x", teacher=str(tmp_path / "stsb" / "last.pt")), progress=False)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        train(config(assets, tmp_path / "y", teacher=str(bad)), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        train(config(assets, tmp_path / "z", teacher=str(tmp_path / "missing.pt")), progress=False)
    # a 2-layer spiking teacher cannot seed a 3-layer student
    with pytest.raises(ConfigError, match="layers"):
        train(config(assets, tmp_path / "w", teacher=str(tmp_path / "stsb" / "last.pt"), task="stsb", layers=3),
              progress=False)


def test_readout_option_sets_the_students_head_and_a_checkpoints_is_kept(assets, tmp_path):
    first = tmp_path / "mean"
    train(config(assets, first, stage="predict", max_steps=1, readout="mean"), progress=False)
    assert load_checkpoint(first / "last.pt").model.config.readout == "mean"  # from the teacher's layers
    kept = tmp_path / "kept"
    train(config(assets, kept, stage="finetune", max_steps=1, teacher=None, init=str(first / "last.pt")),
          progress=False)
    assert load_checkpoint(kept / "last.pt").model.config.readout == "mean"  # --init's readout by default
    back = tmp_path / "back"
    train(config(assets, back, stage="finetune", max_steps=1, teacher=None, init=str(first / "last.pt"),
                 readout="cls"), progress=False)
    assert load_checkpoint(back / "last.pt").model.config.readout == "cls"
    with pytest.raises(ConfigError, match="readout must be one of cls, mean"):
        config(assets, tmp_path / "x", readout="max")
    # a run resumes only with the readout it was started with
    with pytest.raises(ConfigError, match="readout 'mean' there vs 'cls' here"):
        train(config(assets, first, stage="predict", max_steps=1, readout="cls"), resume=True, progress=False)
