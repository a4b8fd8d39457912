"""Summaries of finished training runs, one run or many seeds of one recipe.

Every ``spikesim train`` run writes ``metrics.jsonl`` in its output folder: one JSON line per dev
evaluation (``step``, ``stage``, ``train_loss``, ``dev`` metrics, ``best``). Single-seed GLUE dev
numbers on small tasks move by several points between evaluations, so a result is worth reporting
as best-dev *and* last-checkpoint values over several seeds. :func:`summarize_runs` reads the runs'
metrics files and gives, per run, the best and the last evaluation of one metric, and over the runs
their mean, sample standard deviation, minimum and maximum::

    from spikingbert_sim.runs import summarize_runs
    s = summarize_runs(["runs/mrpc/ternary-s42-pred", "runs/mrpc/ternary-s43-pred"])
    s.best.mean, s.best.std, s.last.mean

``spikesim summary RUN ...`` prints the same.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError, DataError

METRICS_FILE = "metrics.jsonl"  # what trainer.Trainer writes (trainer.METRICS_FILE)


@dataclass(frozen=True)
class Evaluation:
    step: int
    stage: str
    dev: dict[str, float]
    train_loss: float | None
    best_flag: bool  # the trainer saved best.pt at this evaluation


@dataclass(frozen=True)
class RunSummary:
    run: str
    evaluations: int
    metric: str
    best: float  # highest value of ``metric`` (the earliest evaluation on ties)
    best_step: int
    last: float  # value at the last evaluation (what last.pt scored)
    last_step: int
    best_checkpoint_step: int | None  # step of the last evaluation flagged best: what best.pt holds
    dev_at_best: dict[str, float]
    dev_at_last: dict[str, float]


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for a single run
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(n=len(values), mean=statistics.fmean(values),
                   std=statistics.stdev(values) if len(values) > 1 else None, min=min(values), max=max(values))


@dataclass(frozen=True)
class Summary:
    metric: str
    runs: list[RunSummary]
    best: Spread
    last: Spread

    def to_dict(self) -> dict:
        return asdict(self)


def metrics_path(run: str | Path) -> Path:
    """``run`` is a training output folder or its metrics file."""
    run = Path(run)
    path = run / METRICS_FILE if run.is_dir() else run
    if not path.exists():
        where = f"{run} has no {METRICS_FILE}" if run.is_dir() else f"{run}: no such run folder or metrics file"
        raise DataError(where)
    return path


def read_evaluations(run: str | Path) -> list[Evaluation]:
    """The dev evaluations of one run, in file order. A last line cut by a kill is skipped (the
    trainer does the same on resume); any other unreadable line is an error naming it."""
    path = metrics_path(run)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                continue
            raise DataError(f"{path}:{i}: not a JSON line") from None
        dev = row.get("dev") if isinstance(row, dict) else None
        if not isinstance(dev, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}:{i}: not a metrics line of `spikesim train` (no step or dev metrics)")
        values = {k: float(v) for k, v in dev.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        loss = row.get("train_loss")
        out.append(Evaluation(step=row["step"], stage=str(row.get("stage", "")), dev=values,
                              train_loss=float(loss) if isinstance(loss, (int, float)) else None,
                              best_flag=bool(row.get("best", False))))
    if not out:
        raise DataError(f"{path}: no dev evaluations yet")
    return out


def default_metric(evaluations: list[Evaluation]) -> str:
    """``accuracy`` when the task has it, else the first metric the run reports (e.g. ``pearson``,
    ``matthews``)."""
    keys = list(evaluations[-1].dev)
    if not keys:
        raise DataError("the run's evaluations hold no numeric dev metrics")
    return "accuracy" if "accuracy" in keys else keys[0]


def summarize_run(run: str | Path, metric: str | None = None, stage: str | None = None) -> RunSummary:
    evals = read_evaluations(run)
    if stage is not None:
        evals = [e for e in evals if e.stage == stage]
        if not evals:
            raise DataError(f"{run}: no evaluations in stage {stage!r}")
    metric = metric or default_metric(evals)
    missing = [e.step for e in evals if metric not in e.dev]
    if missing:
        have = sorted({k for e in evals for k in e.dev})
        raise ConfigError(f"{run}: metric {metric!r} missing at step {missing[0]} (the run has {', '.join(have)})")
    for e in evals:
        if not math.isfinite(e.dev[metric]):
            raise DataError(f"{run}: {metric} is {e.dev[metric]} at step {e.step}")
    best = max(evals, key=lambda e: e.dev[metric])  # max() keeps the first of equal values
    last = evals[-1]
    flagged = [e.step for e in evals if e.best_flag]
    return RunSummary(run=str(run), evaluations=len(evals), metric=metric, best=best.dev[metric], best_step=best.step,
                      last=last.dev[metric], last_step=last.step,
                      best_checkpoint_step=flagged[-1] if flagged else None,
                      dev_at_best=dict(best.dev), dev_at_last=dict(last.dev))


def summarize_runs(runs: list[str | Path], metric: str | None = None, stage: str | None = None) -> Summary:
    """Per-run best and last values of ``metric`` and their spread over ``runs`` (e.g. seeds)."""
    if not runs:
        raise ConfigError("give at least one run folder")
    if metric is None:
        metric = default_metric(read_evaluations(runs[0]))
    rows = [summarize_run(r, metric, stage) for r in runs]
    return Summary(metric=metric, runs=rows, best=Spread.of([r.best for r in rows]),
                   last=Spread.of([r.last for r in rows]))


def format_summary(summary: Summary, scale: float = 100.0) -> str:
    """A plain-text table (values × ``scale``: GLUE percentages by default)."""
    m = summary.metric
    others = sorted({k for r in summary.runs for k in r.dev_at_best} - {m})
    width = max(len("run"), *(len(r.run) for r in summary.runs))
    head = f"{'run':<{width}}  evals  {'best ' + m:>16} (step)  {'last ' + m:>16} (step)"
    head += "".join(f"  {o + ' at best/last':>22}" for o in others)
    lines = [head]
    for r in summary.runs:
        line = (f"{r.run:<{width}}  {r.evaluations:>5}  {r.best * scale:>16.2f} ({r.best_step:>4})"
                f"  {r.last * scale:>16.2f} ({r.last_step:>4})")
        for o in others:
            b, last = r.dev_at_best.get(o), r.dev_at_last.get(o)
            cell = "/".join("-" if v is None else f"{v * scale:.2f}" for v in (b, last))
            line += f"  {cell:>22}"
        lines.append(line)

    def spread(s: Spread) -> str:
        sd = "" if s.std is None else f" ± {s.std * scale:.2f}"
        return f"{s.mean * scale:.2f}{sd} (min {s.min * scale:.2f}, max {s.max * scale:.2f})"

    n = summary.best.n
    lines.append(f"over {n} run{'s' if n != 1 else ''}: best {m} {spread(summary.best)}; last {m} {spread(summary.last)}"
                 + ("" if n == 1 else "  [mean ± sample std]"))
    return "\n".join(lines)
