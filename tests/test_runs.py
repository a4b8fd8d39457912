"""Run summaries: best-dev and last-checkpoint values per run, mean and sample std over seeds."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from spikingbert_sim.cli import main
from spikingbert_sim.errors import ConfigError, DataError
from spikingbert_sim.runs import format_summary, read_evaluations, summarize_run, summarize_runs


def write_run(folder, accuracies, f1s=None, stage="predict", best_flags=None, extra=""):
    """A metrics.jsonl as `spikesim train` writes it: one line per evaluation, 93 steps apart."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    top = -1.0
    for i, acc in enumerate(accuracies):
        dev = {"accuracy": acc}
        if f1s is not None:
            dev["f1"] = f1s[i]
        flag = acc > top if best_flags is None else best_flags[i]
        top = max(top, acc)
        lines.append(json.dumps({"step": 93 * (i + 1), "stage": stage, "train_loss": 0.5, "dev": dev, "best": flag}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return folder


def test_best_last_and_spread_over_seeds(tmp_path):
    a = write_run(tmp_path / "s42", [0.60, 0.70, 0.65], f1s=[0.5, 0.8, 0.7])
    b = write_run(tmp_path / "s43", [0.72, 0.68, 0.69], f1s=[0.9, 0.6, 0.61])
    c = write_run(tmp_path / "s44", [0.74, 0.74, 0.71], f1s=[0.1, 0.2, 0.3])
    s = summarize_runs([a, b, c])
    assert s.metric == "accuracy"
    assert [(r.best, r.best_step) for r in s.runs] == [(0.70, 186), (0.72, 93), (0.74, 93)]  # ties: earliest
    assert [(r.last, r.last_step) for r in s.runs] == [(0.65, 279), (0.69, 279), (0.71, 279)]
    assert s.runs[0].dev_at_best == {"accuracy": 0.70, "f1": 0.8} and s.runs[0].dev_at_last["f1"] == 0.7
    assert s.best.n == 3 and s.best.mean == pytest.approx(0.72) and s.best.std == pytest.approx(0.02)
    assert s.last.mean == pytest.approx(2.05 / 3) and s.last.std == pytest.approx(0.0305505, rel=1e-5)
    assert (s.best.min, s.best.max, s.last.min, s.last.max) == (0.70, 0.74, 0.65, 0.71)
    by_f1 = summarize_runs([a, b, c], metric="f1")
    assert [r.best_step for r in by_f1.runs] == [186, 93, 279] and by_f1.best.mean == pytest.approx((0.8 + 0.9 + 0.3) / 3)
    text = format_summary(s)
    assert "best accuracy 72.00 ± 2.00 (min 70.00, max 74.00)" in text and "last accuracy 68.33 ± 3.06" in text
    assert "80.00/70.00" in text  # f1 at the best / at the last evaluation of the first run


def test_single_run_has_no_std_and_best_checkpoint_step_follows_the_trainer_flag(tmp_path):
    # the trainer ranks by its task's main metric, which need not be the one summarized
    run = write_run(tmp_path / "r", [0.5, 0.6, 0.55], best_flags=[True, False, True])
    s = summarize_runs([run / "metrics.jsonl"])
    assert s.best.std is None and s.best.mean == 0.6 and s.runs[0].best_checkpoint_step == 279
    assert "±" not in format_summary(s)


def test_default_metric_without_accuracy_and_stage_filter(tmp_path):
    folder = tmp_path / "stsb"
    folder.mkdir()
    rows = [{"step": 10, "stage": "kd", "dev": {"pearson": 0.2, "spearman": 0.1}, "best": True},
            {"step": 20, "stage": "predict", "dev": {"pearson": 0.8, "spearman": 0.7}, "best": True},
            {"step": 30, "stage": "predict", "dev": {"pearson": 0.75, "spearman": 0.9}, "best": False}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = summarize_run(folder)
    assert (r.metric, r.best, r.best_step, r.last) == ("pearson", 0.8, 20, 0.75)
    kd = summarize_run(folder, stage="kd")
    assert (kd.evaluations, kd.best, kd.last) == (1, 0.2, 0.2)
    with pytest.raises(DataError, match="no evaluations in stage 'finetune'"):
        summarize_run(folder, stage="finetune")


def test_cut_last_line_is_skipped_but_a_corrupt_middle_line_is_an_error(tmp_path):
    run = write_run(tmp_path / "killed", [0.5, 0.6], extra='{"step": 279, "stage": "pred')
    assert [e.step for e in read_evaluations(run)] == [93, 186]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "dev": {"accuracy": 0.5}}\nnot json\n{"step": 2, "dev": {}}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON line"):
        read_evaluations(bad)
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 0.3}\n')
    with pytest.raises(DataError, match="not a metrics line"):
        read_evaluations(bad)
    (bad / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no dev evaluations yet"):
        read_evaluations(bad)
    with pytest.raises(ConfigError, match="metric 'mcc' missing at step 93 .the run has accuracy"):
        summarize_run(run, metric="mcc")
    with pytest.raises(ConfigError):
        summarize_runs([])


def test_cli_table_json_and_one_line_errors(tmp_path):
    a = write_run(tmp_path / "s42", [0.60, 0.70])
    b = write_run(tmp_path / "s43", [0.66, 0.64])
    runner = CliRunner()
    res = runner.invoke(main, ["summary", str(a), str(b)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1].startswith("over 2 runs: best accuracy 68.00 ± 2.83 (min 66.00, max 70.00)")
    res = runner.invoke(main, ["summary", str(a), str(b), "--json"])
    data = json.loads(res.output)
    assert data["metric"] == "accuracy" and data["last"]["mean"] == pytest.approx(0.67)
    assert [r["run"] for r in data["runs"]] == [str(a), str(b)]
    for args, fragment in (([str(tmp_path / "missing")], "no such run folder"),
                           ([str(tmp_path)], "has no metrics.jsonl"),
                           ([str(a), "--metric", "f1"], "metric 'f1' missing")):
        res = runner.invoke(main, ["summary", *args])
        assert res.exit_code != 0 and "Traceback" not in res.output
        errors = [line for line in res.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and fragment in errors[0], res.output
