"""GLUE metrics in plain numpy (no scikit-learn or scipy at run time).

Each function matches its usual reference (``sklearn.metrics.accuracy_score``, ``f1_score``,
``matthews_corrcoef``; ``scipy.stats.pearsonr``, ``spearmanr``), except that a correlation that is
undefined because one side is constant is reported as 0.0 rather than NaN: an untrained model that
predicts one class must rank below every real checkpoint, and NaN would compare as neither.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .data import get_task


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both arguments as 1-D arrays of one length (at least one element)."""
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to their label."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class: ``2·TP / (2·TP + FP + FN)``; 0.0 when that class never
    occurs in either argument (scikit-learn's ``zero_division`` default)."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004), as scikit-learn:

        MCC = (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²) · (s² − Σ_k t_k²))

    with ``c`` correct predictions, ``s`` samples, ``p_k`` / ``t_k`` how often class ``k`` is
    predicted / true. For two classes it equals (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    Returns 0.0 when either side holds a single class (the denominator is zero).
    """
    p, y = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    y_codes, p_codes = codes[: y.size], codes[y.size:]
    t_k = np.bincount(y_codes, minlength=classes.size).astype(np.float64)
    p_k = np.bincount(p_codes, minlength=classes.size).astype(np.float64)
    c = float(np.sum(p == y))
    s = float(y.size)
    denominator = np.sqrt((s * s - p_k @ p_k) * (s * s - t_k @ t_k))
    return float((c * s - p_k @ t_k) / denominator) if denominator > 0 else 0.0


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation coefficient; 0.0 when either side is constant."""
    p, y = _pair(predictions, labels)
    p = p.astype(np.float64) - np.mean(p, dtype=np.float64)
    y = y.astype(np.float64) - np.mean(y, dtype=np.float64)
    # Compare with 0 rather than testing > 0, so that NaN inputs give NaN instead of a silent 0.0.
    norm = np.sqrt(p @ p) * np.sqrt(y @ y)
    return 0.0 if norm == 0 else float(np.clip((p @ y) / norm, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks where tied values share the mean of the ranks they span (``rankdata``'s
    ``average`` method): ``[10, 20, 20, 30]`` → ``[1, 2.5, 2.5, 4]``."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each group of equal values
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties handled as scipy does)."""
    p, y = _pair(predictions, labels)
    return pearson(_average_ranks(p), _average_ranks(y))


def _class_ids(predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """Logits ``(N, C)`` → argmax ids; 1-D input is taken as class ids already."""
    if predictions.ndim == 2:
        if predictions.shape[1] != num_labels:
            raise ValueError(f"expected logits with {num_labels} columns, got shape {predictions.shape}")
        return predictions.argmax(axis=-1)
    if predictions.ndim == 1:
        return predictions
    raise ValueError(f"expected logits (N, {num_labels}) or class ids (N,), got shape {predictions.shape}")


def compute_metrics(task: str, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The GLUE metrics of ``task``, keyed as in ``TaskInfo.metric_names``.

    ``predictions`` are logits ``(N, num_labels)`` (argmax is taken), class ids ``(N,)``, or for
    STS-B scores ``(N,)`` / ``(N, 1)``. Keys: ``accuracy`` (SST-2, QNLI, RTE, WNLI, MNLI);
    ``accuracy``, ``f1`` and their mean ``combined`` (MRPC, QQP); ``matthews`` (CoLA);
    ``pearson``, ``spearman`` and their mean ``combined`` (STS-B).
    """
    info = get_task(task)
    p, y = np.asarray(predictions), np.asarray(labels)
    if info.is_regression:
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]  # (N, 1) regression head → (N,)
        if p.ndim != 1:
            raise ValueError(f"expected STS-B scores of shape (N,) or (N, 1), got shape {p.shape}")
        result = {"pearson": pearson(p, y), "spearman": spearman(p, y)}
    else:
        p = _class_ids(p, info.num_labels)
        if "matthews" in info.metric_names:
            result = {"matthews": matthews_corrcoef(p, y)}
        else:
            result = {"accuracy": accuracy(p, y)}
            if "f1" in info.metric_names:
                result["f1"] = f1(p, y)
    if "combined" in info.metric_names:
        result["combined"] = float(np.mean(list(result.values())))
    return result


def main_metric(task: str) -> str:
    """The key of :func:`compute_metrics`'s result to rank checkpoints of ``task`` by."""
    return get_task(task).main_metric


# --- comparing two models on the same examples ---------------------------------------------------

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (examples only the first,
    or only the second, model gets right): under "equally accurate" each discordant pair falls either
    way with probability 1/2, so ``p = min(1, 2 · P[Binomial(b + c, 1/2) ≤ min(b, c)])``."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    from math import comb

    tail = sum(comb(n, i) for i in range(k + 1)) / 2 ** n  # exact in rationals up to the division
    return float(min(1.0, 2 * tail))


def paired_accuracy_test(predictions_a: ArrayLike, predictions_b: ArrayLike, labels: ArrayLike,
                         z: float = 1.959963984540054) -> dict[str, float]:
    """Compare two classifiers' accuracies on the same examples (class ids or logits ``(N, C)``).

    Returns ``accuracy_a``, ``accuracy_b``, their ``difference`` (b − a), its ``ci_low`` / ``ci_high``
    (Wald interval for paired proportions, ``z`` = 1.96: 95 %), the discordant counts ``a_only`` (a
    right, b wrong) and ``b_only``, ``disagree`` (examples where the two predictions differ, right or
    wrong), ``examples`` and McNemar's exact ``p_value`` (:func:`mcnemar_exact`). A difference of a few
    examples on a dev set of hundreds is seldom significant: this is what says so.
    """
    y = np.asarray(labels).reshape(-1)
    pa, pb = np.asarray(predictions_a), np.asarray(predictions_b)
    pa = pa.argmax(axis=-1) if pa.ndim == 2 else pa.reshape(-1)
    pb = pb.argmax(axis=-1) if pb.ndim == 2 else pb.reshape(-1)
    if not (pa.shape == pb.shape == y.shape):
        raise ValueError(f"{pa.size} and {pb.size} predictions for {y.size} labels")
    if y.size == 0:
        raise ValueError("no predictions to compare")
    right_a, right_b = pa == y, pb == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    n = y.size
    diff = (c - b) / n
    se = np.sqrt(max(b + c - (c - b) ** 2 / n, 0.0)) / n
    return {"examples": int(n), "accuracy_a": float(right_a.mean()), "accuracy_b": float(right_b.mean()),
            "difference": float(diff), "ci_low": float(diff - z * se), "ci_high": float(diff + z * se),
            "a_only": b, "b_only": c, "disagree": int(np.sum(pa != pb)), "p_value": mcnemar_exact(b, c)}
