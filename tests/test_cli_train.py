"""``spikesim teacher | train | eval`` through click's CliRunner: the happy paths, and every bad input
ending in a one-line error, a non-zero exit, no traceback and no checkpoint overwritten."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from spikingbert_sim.cli import main

from _train_helpers import make_teacher, tiny_bert_config, write_sst2, write_stsb


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_assets")
    data = write_sst2(root / "glue", n_train=24, n_dev=8)
    write_stsb(data)
    return {"root": root, "data": str(data), "teacher": str(make_teacher(root / "teacher"))}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_one_line_error(result, *fragments, code=None):
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


TRAIN = ["--weights", "ternary", "--timesteps", "4", "--max-steps", "2", "--batch-size", "8", "--layers", "2",
         "--device", "cpu", "--lr", "1e-3"]


def train_args(assets, out, *extra, task="sst2", teacher=None):
    return ["train", "--task", task, "--data", assets["data"], "--teacher", teacher or assets["teacher"],
            "--out", out, *TRAIN, *extra]


# --- happy paths ---------------------------------------------------------------------------------

def test_teacher_finetunes_and_saves_atomically(assets, tmp_path):
    out = tmp_path / "teachers" / "sst2"
    args = ["teacher", "--task", "sst2", "--data", assets["data"], "--model", assets["teacher"], "--out", out,
            "--max-steps", "3", "--batch-size", "8", "--device", "cpu", "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["steps"] == 3 and set(summary["dev_metrics"]) == {"accuracy"}
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "teacher_summary.json"} <= set(files)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["finetuning_task"] == "sst2"
    assert [p.name for p in out.parent.iterdir()] == ["sst2"]  # no temporary folder left behind
    # The saved teacher loads as a teacher.
    from spikingbert_sim.teacher import load_teacher

    model, tokenizer = load_teacher(out, "sst2")
    assert not model.training and model.config.num_labels == 2
    # A second run refuses to overwrite; --force replaces.
    before = (out / "model.safetensors").read_bytes()
    assert_one_line_error(invoke(*args), "exists and is not empty")
    assert (out / "model.safetensors").read_bytes() == before
    again = invoke(*args, "--force", "--seed", "7", "--lr", "1e-3")
    assert again.exit_code == 0, again.output
    assert (out / "model.safetensors").read_bytes() != before


def test_teacher_resumes_an_interrupted_run_to_the_same_teacher(assets, tmp_path, monkeypatch):
    """A teacher run killed after its step-4 state was saved, resumed with --resume, saves the
    teacher an uninterrupted run saves (bit for bit), across an epoch boundary (3 batches an epoch)."""
    from safetensors.torch import load_file

    def args(out, *extra):
        return ["teacher", "--task", "sst2", "--data", assets["data"], "--model", assets["teacher"], "--out", out,
                "--max-steps", "7", "--batch-size", "8", "--device", "cpu", "--save-every", "2", *extra]

    whole = tmp_path / "whole"
    assert invoke(*args(whole)).exit_code == 0
    assert not (whole / "resume.pt").exists()  # the finished teacher replaced the training state

    import torch
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def killed_at_step_5(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return clip(*a, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", killed_at_step_5)
    assert invoke(*args(part)).exit_code != 0
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert sorted(p.name for p in part.iterdir()) == ["resume.pt"]
    assert_one_line_error(invoke(*args(part)), "unfinished teacher run", "--resume")
    assert_one_line_error(invoke(*args(part, "--lr", "1e-4", "--resume")), "another configuration", "lr")
    result = invoke(*args(part, "--resume"))
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "at step 4/7 (epoch 2)" in result.output
    assert not (part / "resume.pt").exists()
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s_whole = json.loads((whole / "teacher_summary.json").read_text())
    s_part = json.loads((part / "teacher_summary.json").read_text())
    assert s_part["dev_metrics"] == s_whole["dev_metrics"] and s_part["final_train_loss"] == s_whole["final_train_loss"]
    assert_one_line_error(invoke(*args(part, "--resume")), "holds a finished teacher")
    # --force starts over in a folder holding an unfinished run
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", killed_at_step_5)
    calls.clear()
    again = tmp_path / "again"
    invoke(*args(again))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert invoke(*args(again, "--force")).exit_code == 0 and not (again / "resume.pt").exists()


def test_teacher_progress_lines(assets, tmp_path):
    args = ["teacher", "--task", "sst2", "--data", assets["data"], "--model", assets["teacher"], "--max-steps", "4",
            "--batch-size", "8", "--device", "cpu", "--no-progress"]
    result = invoke(*args, "--out", tmp_path / "a", "--log-every", "2")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "s/step" in line]
    # 24 examples, batch 8: 3 steps an epoch, so step 4 is in the second epoch
    assert [line.split(" loss")[0] for line in lines] == ["teacher sst2 step 2/4 (epoch 1)",
                                                          "teacher sst2 step 4/4 (epoch 2)"]
    assert lines[-1].endswith("0 s left")
    quiet = invoke(*args, "--out", tmp_path / "b", "--log-every", "0")
    assert quiet.exit_code == 0 and "s/step" not in quiet.output
    assert_one_line_error(invoke(*args, "--out", tmp_path / "c", "--log-every", "-1"), "--log-every")


def test_train_then_eval_and_run_the_checkpoint(assets, tmp_path):
    out = tmp_path / "student"
    result = invoke(*train_args(assets, out, "--stage", "finetune", "--eval-every", "1"))
    assert result.exit_code == 0, result.output
    assert "2 steps; best dev" in result.output
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in records if r["best"]), key=lambda r: r["step"])
    scored = invoke("eval", "--checkpoint", out / "best.pt", "--task", "sst2", "--data", assets["data"],
                    "--timesteps", "4", "--json")
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.output[scored.output.index("{"):])
    assert report["metrics"] == best["dev"] and report["examples"] == 8 and report["split"] == "validation"
    assert (report["device"], report["threads"], report["torch"]) == ("cpu", torch.get_num_threads(), torch.__version__)
    summed = invoke("summary", out, "--json")  # reads the metrics file the trainer wrote
    assert summed.exit_code == 0, summed.output
    run = json.loads(summed.output)["runs"][0]
    assert run["best_checkpoint_step"] == best["step"] and run["evaluations"] == len(records)
    assert run["last"] == records[-1]["dev"]["accuracy"] and run["last_step"] == records[-1]["step"]
    limited = invoke("eval", "-c", out / "last.pt", "--task", "sst2", "--data", assets["data"], "-T", "4",
                     "--limit", "3", "--split", "train")
    assert limited.exit_code == 0 and "sst2 train (3 examples, T=4" in limited.output
    ran = invoke("run", "--checkpoint", out / "best.pt", "--text", "a good film", "-T", "4", "--json")
    assert ran.exit_code == 0, ran.output

    # accuracy versus time steps from one simulation, and adaptive stopping
    report_file = tmp_path / "reports" / "eval.json"
    swept = invoke("eval", "-c", out / "best.pt", "--task", "sst2", "--data", assets["data"], "-T", "4",
                   "--sweep", "1,2,4,6", "--adaptive", "--adaptive-window", "2", "--adaptive-min-steps", "2",
                   "--adaptive-check-every", "1", "--adaptive-asr-tol", "1", "--out", report_file, "--json")
    assert swept.exit_code == 0, swept.output
    report = json.loads(report_file.read_text())
    assert report == json.loads(swept.output[swept.output.index("{"):])
    assert [p["timesteps"] for p in report["sweep"]] == [1, 2, 4, 6]
    assert report["sweep"][2]["metrics"] == best["dev"] == report["metrics"]  # T=4 from the sweep
    for point in report["sweep"]:
        single = invoke("eval", "-c", out / "best.pt", "--task", "sst2", "--data", assets["data"],
                        "-T", point["timesteps"], "--json")
        single = json.loads(single.output[single.output.index("{"):])
        assert single["metrics"] == point["metrics"]
        if point["timesteps"] == 4:  # the sweep's predictions at its T are those of a plain T-step eval
            assert single["predictions"] == {k: v for k, v in report["predictions"].items() if k != "adaptive"}
    assert len(report["predictions"]["adaptive"]) == 8
    adaptive = report["adaptive"]
    assert 3 <= adaptive["mean_timesteps"] <= 4 and adaptive["max_timesteps"] == 4  # checks from step 3 on
    assert adaptive["criterion"]["window"] == 2 and set(adaptive["metrics"]) == {"accuracy"}
    drawn = invoke("plot", report_file, report_file, "--out", tmp_path / "figs")
    assert drawn.exit_code == 0, drawn.output
    assert (tmp_path / "figs" / "accuracy_vs_timesteps.png").stat().st_size > 1000
    assert invoke("plot", report_file, "--metric", "accuracy", "--out", tmp_path / "figs").exit_code == 0
    assert_one_line_error(invoke("plot", report_file, "--metric", "f1"), "no metric 'f1'")
    assert_one_line_error(invoke("eval", "-c", out / "best.pt", "--task", "sst2", "--data", assets["data"],
                                 "--sweep", "0,4"), "--sweep", code=2)
    assert_one_line_error(invoke("eval", "-c", out / "best.pt", "--task", "sst2", "--data", assets["data"],
                                 "--adaptive", "--adaptive-asr-tol", "-1"), "asr_tol")
    assert_one_line_error(invoke("plot", tmp_path / "ran.json"), "no such file")
    no_sweep = tmp_path / "plain.json"
    no_sweep.write_text(json.dumps({"metrics": {}}))
    assert_one_line_error(invoke("plot", no_sweep), "no accuracy-vs-time-steps sweep")
    assert_one_line_error(invoke("plot", no_sweep, tmp_path / "traces.npz"), "not both", code=2)


# --- bad input -----------------------------------------------------------------------------------

def test_unknown_task_and_missing_or_malformed_data(assets, tmp_path):
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", task="sst3")), "unknown task 'sst3'")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = train_args(assets, tmp_path / "b")
    args[args.index("--data") + 1] = str(empty)
    assert_one_line_error(invoke(*args), "no SST-2 folder")
    bad = write_sst2(tmp_path / "bad")
    train_tsv = bad / "SST-2" / "train.tsv"
    lines = train_tsv.read_text().splitlines()
    lines[5] = "a sentence without its label"
    train_tsv.write_text("\n".join(lines) + "\n")
    args[args.index("--data") + 1] = str(bad)
    assert_one_line_error(invoke(*args), "train.tsv:6", "columns")
    lines[5] = "a film\t7"
    train_tsv.write_text("\n".join(lines) + "\n")
    assert_one_line_error(invoke(*args), "train.tsv:6", "label '7'")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    assert_one_line_error(invoke("eval", "-c", tmp_path / "none.pt", "--task", "sst2", "--data", assets["data"]),
                          "no such file")


def test_teachers_that_do_not_fit(assets, tmp_path):
    import transformers

    # A teacher for another task (3 labels for SST-2).
    three = make_teacher(tmp_path / "three", num_labels=3)
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", teacher=str(three))), "3 label(s)", "needs 2")
    # A teacher whose vocabulary is smaller than its tokenizer.
    small = make_teacher(tmp_path / "small_vocab", vocab_size=12)
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "b", teacher=str(small))), "tokenizer has", "vocabulary")
    # A plain BERT without a classification head.
    plain = tmp_path / "plain"
    transformers.BertModel(tiny_bert_config()).save_pretrained(plain)
    transformers.AutoTokenizer.from_pretrained(assets["teacher"]).save_pretrained(plain)
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "c", teacher=str(plain))), "not a fine-tuned BERT classifier")
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "d", teacher=str(tmp_path / "nowhere"))))
    # A student (from a checkpoint) whose heads cannot match the teacher's attention, or whose
    # vocabulary differs from the teacher's tokenizer.
    from spikingbert_sim.checkpoint import save_checkpoint
    from spikingbert_sim.config import SpikingBertConfig
    from spikingbert_sim.model import SpikingBertForSequenceClassification

    for name, fields, message in (("heads", dict(num_attention_heads=2), "equal head counts"),
                                  ("vocab", dict(vocab_size=99), "vocabulary of 99")):
        cfg = SpikingBertConfig(**{**dict(vocab_size=tiny_bert_config().vocab_size, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=128),
                                   **fields})
        save_checkpoint(SpikingBertForSequenceClassification(cfg), tmp_path / f"{name}.pt", packed=False)
        assert_one_line_error(invoke(*train_args(assets, tmp_path / f"s_{name}", "--init", tmp_path / f"{name}.pt",
                                                 "--stage", "kd")), message)
    # A student too deep for its teacher.
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "e", "--layers", "9")), "exceeds the teacher's 4 layers")


def test_resume_and_overwrite_refusals_keep_checkpoints(assets, tmp_path):
    out = tmp_path / "run"
    assert invoke(*train_args(assets, out, "--stage", "finetune")).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(invoke(*train_args(assets, out, "--stage", "finetune")), "already holds checkpoints")
    assert_one_line_error(invoke(*train_args(assets, out, "--stage", "finetune", "--seed", "3", "--resume")),
                          "cannot resume", "another configuration", "seed")
    assert_one_line_error(invoke(*train_args(assets, out, "--stage", "finetune", "--weights", "binary", "--resume")),
                          "weights 'ternary' there vs 'binary' here")
    (out / "last.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(invoke(*train_args(assets, out, "--stage", "finetune", "--resume")), "last.pt")
    (out / "last.pt").write_bytes(before["last.pt"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_options_are_usage_errors(assets, tmp_path):
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", "--timesteps", "0")), "--timesteps", code=2)
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", "--method", "ode")), code=2)
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", "--layer-map", "x,y")), "--layer-map", code=2)
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", "--layer-map", "1,9")), "teacher hidden states 0..4")
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", "--lr", "-1")), "lr must be a positive number")
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", "--transfer", "mrpc")),
                          "--transfer mrpc", "single sentences")
    assert_one_line_error(invoke(*train_args(assets, tmp_path / "a", "--transfer", "cola")), "no CoLA folder")
    assert not (tmp_path / "a").exists()
    assert_one_line_error(invoke("train", "--task", "sst2", "--data", assets["data"], "--out", tmp_path / "b",
                                 "--stage", "kd", "--init", "random"), "needs a teacher")
    # A checkpoint for another task's head.
    out = tmp_path / "stsb"
    stsb_teacher = make_teacher(tmp_path / "stsb_teacher", num_labels=1)
    assert invoke(*train_args(assets, out, "--stage", "finetune", task="stsb", teacher=str(stsb_teacher))).exit_code == 0
    assert_one_line_error(invoke("eval", "-c", out / "last.pt", "--task", "sst2", "--data", assets["data"]),
                          "1-label head", "needs 2")
    assert Path(out / "best.pt").exists()


def test_eval_analog_scores_the_steady_state_network(assets, tmp_path):
    out = tmp_path / "student"
    assert invoke(*train_args(assets, out, "--stage", "finetune")).exit_code == 0
    scored = invoke("eval", "-c", out / "last.pt", "--task", "sst2", "--data", assets["data"], "-T", "4",
                    "--analog", "--batch-size", "3", "--json")
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.output[scored.output.index("{"):])
    # independently: the whole dev set in one padded batch through the analog pass
    import torch
    from spikingbert_sim.checkpoint import load_checkpoint
    from spikingbert_sim.data import GlueDataset, load_glue
    from spikingbert_sim.equilibrium import steady_state_forward
    from spikingbert_sim.hf import tokenizer_from_meta
    from spikingbert_sim.metrics import compute_metrics

    ckpt = load_checkpoint(out / "last.pt")
    t = GlueDataset.from_split(load_glue("sst2", "dev", assets["data"]), tokenizer_from_meta(ckpt.meta)).tensors
    with torch.no_grad():
        logits = steady_state_forward(ckpt.model.eval(), t["input_ids"], t["attention_mask"], t["token_type_ids"]).logits
    assert report["analog"] == compute_metrics("sst2", logits.numpy(), t["labels"].numpy())
    preds = report["predictions"]  # per example, in the split's order, beside the labels
    assert preds["analog"] == logits.argmax(-1).tolist() and preds["labels"] == t["labels"].tolist()
    assert sum(p == y for p, y in zip(preds["spiking"], preds["labels"])) / 8 == report["metrics"]["accuracy"]
    report_file = tmp_path / "analog.json"
    report_file.write_text(json.dumps(report))
    paired = invoke("significance", report_file, report_file, "--which-b", "analog", "--json")
    assert paired.exit_code == 0, paired.output
    r = json.loads(paired.output)
    assert (r["accuracy_a"], r["accuracy_b"]) == (report["metrics"]["accuracy"], report["analog"]["accuracy"])
    assert r["disagree"] == sum(a != b for a, b in zip(preds["spiking"], preds["analog"]))
    assert set(report["metrics"]) == {"accuracy"}  # the spiking score at T=4 is still reported
    plain = invoke("eval", "-c", out / "last.pt", "--task", "sst2", "--data", assets["data"], "-T", "4", "--analog")
    assert "analog (T -> infinity): accuracy=" in plain.output


def test_one_run_at_a_time_per_output_folder(assets, tmp_path):
    """A second run on a folder another process is writing is refused before it touches anything;
    a lock left by a killed run does not block the next one; the lock file goes with the run."""
    import os
    import signal
    import subprocess
    import sys

    from spikingbert_sim.fileio import exclusive, lock_path

    out = tmp_path / "run"
    teacher = ["teacher", "--task", "sst2", "--data", assets["data"], "--model", assets["teacher"],
               "--out", out, "--max-steps", "1", "--batch-size", "8", "--device", "cpu"]
    with exclusive(out):
        for args in (train_args(assets, out, "--stage", "finetune"), teacher):
            assert_one_line_error(invoke(*args), f"{out} is in use by another run (process {os.getpid()})",
                                  "choose another --out")
        assert not out.exists()
    assert not lock_path(out).exists()
    # a holder killed outright leaves its lock file, not its lock
    code = f"from spikingbert_sim.fileio import exclusive\nwith exclusive({str(out)!r}):\n    import os, signal\n" \
           f"    os.kill(os.getpid(), signal.SIGKILL)\n"
    killed = subprocess.run([sys.executable, "-c", code])
    assert killed.returncode == -signal.SIGKILL and lock_path(out).exists()
    result = invoke(*train_args(assets, out, "--stage", "finetune"))
    assert result.exit_code == 0, result.output
    assert (out / "last.pt").exists() and not lock_path(out).exists()


def _report(path, predictions, labels, task="sst2", split="validation", **extra):
    report = {"label": Path(path).stem, "task": task, "split": split, "timesteps": 80,
              "predictions": {"labels": labels, "spiking": predictions, **extra}}
    Path(path).write_text(json.dumps(report))
    return path


def test_significance_pairs_two_reports_example_by_example(tmp_path):
    labels = [0, 1] * 50  # 100 examples
    a = list(labels)
    b = list(labels)
    for i in range(9):  # B wrong where A is right on 9, A wrong where B is right on 1: a 8-point gap
        b[i] = 1 - labels[i]
    a[50] = 1 - labels[50]
    a[60] = b[60] = 1 - labels[60]  # both wrong, the same way: not discordant
    fa, fb = _report(tmp_path / "a.json", a, labels), _report(tmp_path / "b.json", b, labels)
    out = invoke("significance", fa, fb, "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert (r["a_only"], r["b_only"], r["disagree"], r["examples"]) == (9, 1, 10, 100)
    assert (r["accuracy_a"], r["accuracy_b"]) == (0.98, 0.90)
    assert r["p_value"] == pytest.approx(0.021484375, abs=1e-12)  # 2 * (1 + 10) / 2**10
    se = (10 - 64 / 100) ** 0.5 / 100
    assert r["difference"] == pytest.approx(-0.08) and r["ci_low"] == pytest.approx(-0.08 - 1.959963984540054 * se)
    text = invoke("significance", fa, fb).output
    assert "B - A: -8.00 points" in text and "McNemar exact p = 0.0215" in text

    # reports that cannot be paired: one-line errors
    assert_one_line_error(invoke("significance", fa, _report(tmp_path / "c.json", a[:99], labels[:99])),
                          "different examples")
    assert_one_line_error(invoke("significance", fa, _report(tmp_path / "d.json", a, labels, task="rte")),
                          "the same examples")
    assert_one_line_error(invoke("significance", fa, fb, "--which", "analog"), "no analog predictions", "--analog")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"task": "sst2", "split": "validation", "metrics": {"accuracy": 0.9}}))
    assert_one_line_error(invoke("significance", fa, old), "no per-example predictions")
    stsb = [0.5, 2.0, 4.5]
    assert_one_line_error(invoke("significance", _report(tmp_path / "s1.json", stsb, stsb, task="stsb"),
                                 _report(tmp_path / "s2.json", stsb, stsb, task="stsb")), "regression")
    assert_one_line_error(invoke("significance", fa, tmp_path / "missing.json"), "no such file")
    (tmp_path / "junk.json").write_text("{not json")
    assert_one_line_error(invoke("significance", fa, tmp_path / "junk.json"), "not a JSON report")
    assert_one_line_error(invoke("significance", fa, fb, "--which", "exact"), code=2)


def test_initial_membrane_option_of_eval_and_run(assets, tmp_path):
    from spikingbert_sim.checkpoint import load_checkpoint
    from spikingbert_sim.data import GlueDataset, load_glue
    from spikingbert_sim.hf import tokenizer_from_meta
    from spikingbert_sim.trainer import evaluate_student

    out = tmp_path / "student"
    assert invoke(*train_args(assets, out, "--stage", "finetune")).exit_code == 0
    scored = invoke("eval", "-c", out / "last.pt", "--task", "sst2", "--data", assets["data"], "-T", "4",
                    "--initial-membrane", "0.5", "--json")
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.output[scored.output.index("{"):])
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.model.config.initial_membrane == 0.0 and report["initial_membrane"] == 0.5
    model = ckpt.model
    model.config = model.config.replace(initial_membrane=0.5)
    t = GlueDataset.from_split(load_glue("sst2", "dev", assets["data"]), tokenizer_from_meta(ckpt.meta)).tensors
    metrics, logits = evaluate_student(model, "sst2", t, 4, 32, "cpu")
    assert report["metrics"] == metrics and report["predictions"]["spiking"] == logits.argmax(-1).tolist()

    def layers(*extra):
        ran = invoke("run", "-c", out / "last.pt", "--text", "a good film", "-T", "4", "--json", *extra)
        assert ran.exit_code == 0, ran.output
        return json.loads(ran.output)["layers"]

    # from half threshold every neuron with any input fires sooner: more spikes in 4 steps
    rest, half = layers(), layers("--initial-membrane", "0.5")
    assert sum(r["final_asr"] for r in half.values()) > sum(r["final_asr"] for r in rest.values())
    assert_one_line_error(invoke("eval", "-c", out / "last.pt", "--task", "sst2", "--data", assets["data"],
                                 "--initial-membrane", "1"), "--initial-membrane", code=2)
