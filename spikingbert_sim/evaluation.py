"""Scoring a spiking model on a GLUE split: at one T, at many T from one simulation, adaptively.

* :func:`evaluate_student`: the task's metrics after ``timesteps`` steps of spiking simulation.
* :func:`sweep_timesteps`: metrics at every T of a list from *one* simulation of the largest T
  (:func:`sweep_logits`: the logits themselves).
  The head reads the output ASR after every step (``RecordOptions(logits_trace=True)``) and a
  T-step run's logits are exactly that trace's T-th entry (the dynamics are causal), so an
  accuracy-versus-time-steps curve costs one simulation instead of one per point.
* :func:`evaluate_adaptive`: every batch stops once its output layer has settled
  (:class:`~spikingbert_sim.simulation.AdaptiveOptions`); reports the metrics and the time steps
  each example used.

Examples are simulated in batches of similar length (sorted by token count, results put back in
the dataset's order): padding never changes a valid token's result, so this only saves work.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import ConfigError, DataError
from .model import SpikingBertForSequenceClassification
from .simulation import AdaptiveOptions, RecordOptions, check_timesteps, simulate


def trim_batch(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """Cut (B, max_length) token tensors to the longest sequence of the batch and move to ``device``.

    Padding never changes a valid token's result (masked keys get zero attention), so this only
    saves work.
    """
    length = max(1, int(batch["attention_mask"].sum(1).max()))
    return {k: (v[:, :length] if v.dim() == 2 else v).to(device) for k, v in batch.items()}


def length_batches(tensors: dict[str, Tensor], batch_size: int) -> Iterator[Tensor]:
    """Index batches of examples sorted by token count (stable, so ties keep dataset order)."""
    lengths = tensors["attention_mask"].sum(1)
    order = torch.sort(lengths, stable=True).indices
    yield from order.split(batch_size)


def _progress(iterable, total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not show, leave=False, file=sys.stderr)


def _batches(model, tensors, batch_size, device, desc, show):
    n = tensors["input_ids"].shape[0]
    if n == 0:
        raise ConfigError("no examples to evaluate")
    if model.config.vocab_size <= int(tensors["input_ids"].max()):
        raise ConfigError(f"token id {int(tensors['input_ids'].max())} is outside the model's vocabulary "
                          f"of {model.config.vocab_size}")
    count = -(-n // batch_size)
    for idx in _progress(length_batches(tensors, batch_size), count, desc, show):
        yield idx, trim_batch({k: v[idx] for k, v in tensors.items()}, device)


def _score(model, task, tensors, batch_size, device, desc, progress, forward) -> tuple[dict[str, float], Tensor]:
    """GLUE metrics and logits (in the tensors' order) of ``forward(batch) -> logits`` over length batches."""
    from .metrics import compute_metrics

    logits = torch.empty(tensors["input_ids"].shape[0], model.config.num_labels)
    for idx, b in _batches(model, tensors, batch_size, device, desc, progress):
        logits[idx] = forward(b).float().cpu()
    return compute_metrics(task, logits.numpy(), tensors["labels"].numpy()), logits


@torch.no_grad()
def evaluate_student(model: SpikingBertForSequenceClassification, task: str, tensors: dict[str, Tensor],
                     timesteps: int, batch_size: int, device: torch.device | str, engine: str = "fast",
                     progress: bool = False) -> tuple[dict[str, float], Tensor]:
    """GLUE metrics of the spiking model simulated for ``timesteps`` steps on tokenized tensors
    (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``). Returns ``(metrics, logits)``
    with logits in the tensors' order."""
    timesteps = check_timesteps(timesteps)
    return _score(model, task, tensors, batch_size, device, f"eval T={timesteps}", progress,
                  lambda b: simulate(model, b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                     timesteps=timesteps, engine=engine).logits)


@torch.no_grad()
def evaluate_analog(model: SpikingBertForSequenceClassification, task: str, tensors: dict[str, Tensor],
                    batch_size: int, device: torch.device | str, progress: bool = False) -> tuple[dict[str, float], Tensor]:
    """GLUE metrics of the model's analog equilibrium (T → ∞: every neuron fires at its steady-state
    rate ``clip(I / V_th, 0, 1)``), the rate network that the spiking simulation approaches and that
    ``--method steady_state`` trains. Its gap to :func:`evaluate_student` at a given T is what the
    finite simulation costs. Returns ``(metrics, logits)`` with logits in the tensors' order."""
    from .equilibrium import steady_state_forward

    was_training = model.training
    model.eval()
    try:
        return _score(model, task, tensors, batch_size, device, "eval analog", progress,
                      lambda b: steady_state_forward(model, b["input_ids"], b["attention_mask"],
                                                     b["token_type_ids"]).logits)
    finally:
        model.train(was_training)


def parse_timesteps_list(text: str) -> list[int]:
    """``"1,2,4,80"`` -> ``[1, 2, 4, 80]`` (sorted, unique, each a positive integer)."""
    try:
        values = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"expected comma-separated time steps, e.g. 1,2,4,8; got {text!r}") from None
    if not values or values[0] <= 0:
        raise ConfigError(f"time steps must be positive integers, got {text!r}")
    return values


@torch.no_grad()
def sweep_timesteps(model: SpikingBertForSequenceClassification, task: str, tensors: dict[str, Tensor],
                    timesteps: Sequence[int], batch_size: int, device: torch.device | str,
                    engine: str = "fast", progress: bool = False) -> dict[int, dict[str, float]]:
    """Metrics at every T of ``timesteps``, from one simulation of ``max(timesteps)`` steps per
    batch (exactly what separate T-step runs give; ``tests/test_adaptive.py``)."""
    logits = sweep_logits(model, tensors, timesteps, batch_size, device, engine=engine, progress=progress)
    return metrics_by_timesteps(task, logits, tensors["labels"])


def metrics_by_timesteps(task: str, logits: dict[int, Tensor], labels: Tensor) -> dict[int, dict[str, float]]:
    """GLUE metrics of each T's logits (:func:`sweep_logits`)."""
    from .metrics import compute_metrics

    return {t: compute_metrics(task, v.numpy(), labels.numpy()) for t, v in logits.items()}


@torch.no_grad()
def sweep_logits(model: SpikingBertForSequenceClassification, tensors: dict[str, Tensor],
                 timesteps: Sequence[int], batch_size: int, device: torch.device | str,
                 engine: str = "fast", progress: bool = False) -> dict[int, Tensor]:
    """Logits ``(N, num_labels)``, in the tensors' order, at every T of ``timesteps`` (ascending),
    from one simulation of ``max(timesteps)`` steps per batch."""
    steps = sorted({check_timesteps(t) for t in timesteps})
    T = steps[-1]
    n = tensors["input_ids"].shape[0]
    trace = torch.empty(len(steps), n, model.config.num_labels)
    pick = torch.tensor([t - 1 for t in steps])
    for idx, b in _batches(model, tensors, batch_size, device, f"sweep T<={T}", progress):
        r = simulate(model, b["input_ids"], b["attention_mask"], b["token_type_ids"], timesteps=T, engine=engine,
                     record=RecordOptions(logits_trace=True))
        trace[:, idx] = r.logits_trace.index_select(0, pick).float()
    return {t: trace[i] for i, t in enumerate(steps)}


@dataclass
class AdaptiveResult:
    """What :func:`evaluate_adaptive` measured."""

    metrics: dict[str, float]
    steps: Tensor  # (N,) time steps each example was simulated for (its batch's stopping step)
    logits: Tensor  # (N, num_labels)
    max_timesteps: int

    @property
    def mean_steps(self) -> float:
        return float(self.steps.double().mean())

    def to_dict(self) -> dict:
        s = self.steps.double()
        return {"metrics": self.metrics, "mean_timesteps": round(self.mean_steps, 3),
                "median_timesteps": float(s.median()), "max_timesteps": self.max_timesteps,
                "stopped_early_fraction": round(float((self.steps < self.max_timesteps).double().mean()), 4)}


@torch.no_grad()
def evaluate_adaptive(model: SpikingBertForSequenceClassification, task: str, tensors: dict[str, Tensor],
                      max_timesteps: int, options: AdaptiveOptions, batch_size: int, device: torch.device | str,
                      engine: str = "fast", progress: bool = False) -> AdaptiveResult:
    """Metrics when every batch stops as soon as its output layer has settled (at most
    ``max_timesteps`` steps). ``batch_size`` 1 makes the decision per example."""
    from .metrics import compute_metrics

    max_timesteps = check_timesteps(max_timesteps)
    n = tensors["input_ids"].shape[0]
    logits = torch.empty(n, model.config.num_labels)
    steps = torch.empty(n, dtype=torch.long)
    for idx, b in _batches(model, tensors, batch_size, device, "adaptive", progress):
        r = simulate(model, b["input_ids"], b["attention_mask"], b["token_type_ids"], timesteps=max_timesteps,
                     engine=engine, adaptive=options)
        logits[idx] = r.logits.float().cpu()
        steps[idx] = r.timesteps
    metrics = compute_metrics(task, logits.numpy(), tensors["labels"].numpy())
    return AdaptiveResult(metrics=metrics, steps=steps, logits=logits, max_timesteps=max_timesteps)


def curves_from_reports(reports: Sequence[dict], metric: str | None = None
                        ) -> tuple[dict[str, tuple[list[int], list[float]]], str]:
    """``spikesim eval --json`` reports with a ``sweep`` -> ``{label: (T values, metric values)}``
    for :func:`~spikingbert_sim.plotting.plot_accuracy_vs_timesteps`, and the metric's name."""
    curves = {}
    for i, rep in enumerate(reports):
        sweep = rep.get("sweep") if isinstance(rep, dict) else None
        if not sweep:
            raise ConfigError(f"report {i + 1} has no accuracy-vs-time-steps sweep (run spikesim eval --sweep)")
        name = metric or rep.get("main_metric") or next(iter(sweep[0]["metrics"]))
        if any(name not in point["metrics"] for point in sweep):
            raise ConfigError(f"report {i + 1} has no metric {name!r}")
        label = rep.get("label") or f"{rep.get('weight_mode', '?')} ({rep.get('checkpoint', i + 1)})"
        curves[label] = ([int(p["timesteps"]) for p in sweep], [float(p["metrics"][name]) for p in sweep])
        metric = name
    return curves, metric or "accuracy"


def adaptive_points_from_reports(reports: Sequence[dict], metric: str) -> dict[str, tuple[float, float]]:
    """``{label: (mean time steps, metric)}`` of the reports that scored adaptive stopping
    (``spikesim eval --adaptive``), labelled as :func:`curves_from_reports` labels them."""
    points = {}
    for i, rep in enumerate(reports):
        adaptive = rep.get("adaptive") if isinstance(rep, dict) else None
        if not adaptive or metric not in adaptive.get("metrics", {}):
            continue
        label = rep.get("label") or f"{rep.get('weight_mode', '?')} ({rep.get('checkpoint', i + 1)})"
        points[label] = (float(adaptive["mean_timesteps"]), float(adaptive["metrics"][metric]))
    return points


# --- eval reports (`spikesim eval --out`) ------------------------------------------------------------

PREDICTION_KINDS = ("spiking", "analog", "adaptive")
"""Per-example predictions an eval report can hold: at its T, of the analog equilibrium, adaptive."""


def read_report(path: str | Path) -> dict:
    """An eval report (JSON) as a dict; a missing or unreadable file is a :class:`DataError`."""
    import json

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a JSON report ({exc})") from None
    if not isinstance(report, dict):
        raise DataError(f"{path}: not an eval report (expected a JSON object)")
    return report


def compare_reports(a: dict, b: dict, which_a: str = "spiking", which_b: str | None = None,
                    names: tuple[str, str] = ("A", "B")) -> dict:
    """Paired accuracy test (:func:`~spikingbert_sim.metrics.paired_accuracy_test`) of two eval reports
    scored on the same examples: ``which_a`` / ``which_b`` pick their predictions (``spiking``, at the
    report's T; ``analog``; ``adaptive``). Raises :class:`DataError` when the reports cannot be paired."""
    from .data import get_task
    from .metrics import paired_accuracy_test

    which_b = which_b or which_a
    picked = []
    for report, which, name in ((a, which_a, names[0]), (b, which_b, names[1])):
        if which not in PREDICTION_KINDS:
            raise ConfigError(f"predictions must be one of {', '.join(PREDICTION_KINDS)}, got {which!r}")
        preds = report.get("predictions")
        if not isinstance(preds, dict) or "labels" not in preds:
            raise DataError(f"{name} holds no per-example predictions (an older report: score it again with "
                            "`spikesim eval --out`)")
        if which not in preds:
            flag = {"analog": " --analog", "adaptive": " --adaptive"}.get(which, "")
            raise DataError(f"{name} holds no {which} predictions (score it with `spikesim eval{flag} --out`)")
        picked.append(preds)
    if a.get("task") != b.get("task") or a.get("split") != b.get("split"):
        raise DataError(f"{names[0]} scores {a.get('task')} {a.get('split')} but {names[1]} "
                        f"{b.get('task')} {b.get('split')}: a paired test needs the same examples")
    info = get_task(a.get("task") or "")
    if info.is_regression:
        raise DataError(f"task {info.name} is a regression: the paired test compares class predictions")
    labels_a, labels_b = picked[0]["labels"], picked[1]["labels"]
    if labels_a != labels_b:
        raise DataError(f"{names[0]} and {names[1]} hold different examples ({len(labels_a)} and {len(labels_b)} "
                        "labels, or another order): a paired test needs the same examples")
    result = paired_accuracy_test(picked[0][which_a], picked[1][which_b], labels_a)
    return {"task": info.name, "split": a.get("split"), "a": {"label": a.get("label"), "predictions": which_a,
            "timesteps": a.get("timesteps")}, "b": {"label": b.get("label"), "predictions": which_b,
            "timesteps": b.get("timesteps")}, **result}

