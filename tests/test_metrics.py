"""GLUE metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from spikingbert_sim.metrics import (accuracy, compute_metrics, f1, main_metric, matthews_corrcoef, pearson,
                                     spearman)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(np.array([[2]]), [2]) == 1.0


def test_f1_by_hand():
    # TP = 2 (idx 0, 2), FP = 1 (idx 3), FN = 1 (idx 1): F1 = 4 / (4 + 1 + 1)
    assert f1([1, 0, 1, 1, 0], [1, 1, 1, 0, 0]) == pytest.approx(4 / 6)
    assert f1([0, 0], [0, 0]) == 0.0  # positive class never occurs
    assert f1([0, 1, 0], [0, 1, 1], positive=0) == pytest.approx(2 / 3)  # TP 1, FP 1, FN 0


def test_mcc_two_classes_matches_confusion_formula():
    y = [1, 1, 1, 1, 0, 0, 0, 1, 0, 0]
    p = [1, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    tp, tn, fp, fn = 4, 4, 1, 1
    want = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert want == pytest.approx(0.6)
    assert matthews_corrcoef(p, y) == pytest.approx(want)
    assert matthews_corrcoef(y, y) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - v for v in y], y) == pytest.approx(-1.0)


def test_mcc_unbalanced_and_degenerate():
    # TP 1, TN 3, FP 0, FN 2: (3 - 0) / sqrt(1 * 3 * 3 * 5)
    assert matthews_corrcoef([1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]) == pytest.approx(3 / math.sqrt(45))
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant predictions: undefined -> 0


def test_mcc_multiclass_gorodkin():
    y = [0, 1, 2, 0, 1, 2]
    p = [0, 2, 2, 0, 1, 1]
    # c = 4, s = 6, t_k = (2, 2, 2), p_k = (2, 2, 2): (24 - 12) / sqrt((36 - 12)(36 - 12)) = 0.5
    assert matthews_corrcoef(p, y) == pytest.approx(0.5)


def test_pearson_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]
    y = [2.0, 1.0, 4.0, 3.0]
    # deviations (-1.5, -.5, .5, 1.5) and (-.5, -1.5, 1.5, .5): 4 × 0.75 / (sqrt 5 · sqrt 5)
    assert pearson(x, y) == pytest.approx(0.6)
    assert pearson(x, [2 * v + 7 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [-v for v in x]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_spearman_with_ties():
    p = [10, 20, 20, 30]
    y = [1, 3, 2, 4]
    # average ranks of p: (1, 2.5, 2.5, 4); Pearson with (1, 3, 2, 4)
    rp = np.array([1, 2.5, 2.5, 4.0]) - 2.5
    ry = np.array([1, 3, 2, 4.0]) - 2.5
    want = float(rp @ ry / math.sqrt((rp @ rp) * (ry @ ry)))
    assert want == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman(p, y) == pytest.approx(want)
    # monotone but non-linear: Spearman 1, Pearson < 1
    x = [1, 2, 3, 4, 5]
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [v ** 3 for v in x]) < 0.99


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        f1([], [])


def test_compute_metrics_keys_per_task():
    logits2 = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # argmax 1, 0, 1, 0
    labels2 = np.array([1, 0, 0, 0])
    assert compute_metrics("sst2", logits2, labels2) == {"accuracy": 0.75}
    for task in ("qnli", "rte", "wnli"):
        assert set(compute_metrics(task, logits2, labels2)) == {"accuracy"}
    mrpc = compute_metrics("mrpc", logits2, labels2)
    assert set(mrpc) == {"accuracy", "f1", "combined"}
    assert mrpc["f1"] == pytest.approx(2 / 3)  # TP 1, FP 1, FN 0
    assert mrpc["combined"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert set(compute_metrics("qqp", logits2, labels2)) == {"accuracy", "f1", "combined"}
    cola = compute_metrics("cola", logits2, labels2)
    assert set(cola) == {"matthews"}
    assert cola["matthews"] == pytest.approx(matthews_corrcoef([1, 0, 1, 0], labels2))
    mnli = compute_metrics("mnli", np.eye(3)[[0, 2, 1]], [0, 1, 1])
    assert mnli == {"accuracy": pytest.approx(2 / 3)}
    stsb = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0], [4.0]]), [2.0, 1.0, 4.0, 3.0])
    assert set(stsb) == {"pearson", "spearman", "combined"}
    assert stsb["pearson"] == pytest.approx(0.6) and stsb["spearman"] == pytest.approx(0.6)
    assert stsb["combined"] == pytest.approx(0.6)
    assert compute_metrics("STS-B", [1.0, 2.0], [1.0, 2.0])["pearson"] == pytest.approx(1.0)
    assert compute_metrics("sst2", [1, 0], [1, 1]) == {"accuracy": 0.5}  # class ids accepted too


def test_compute_metrics_shape_errors():
    with pytest.raises(ValueError, match="2 columns"):
        compute_metrics("sst2", np.zeros((3, 3)), [0, 1, 0])
    with pytest.raises(ValueError, match="STS-B"):
        compute_metrics("stsb", np.zeros((3, 2)), [0, 1, 0])


def test_main_metric():
    assert main_metric("cola") == "matthews"
    assert main_metric("mrpc") == "combined"
    assert main_metric("sst2") == "accuracy"
    assert main_metric("stsb") == "combined"


def test_mcnemar_exact_against_binomial_tails():
    from spikingbert_sim.metrics import mcnemar_exact

    assert mcnemar_exact(0, 6) == 2 / 64  # all 6 discordant pairs one way
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=1e-15)
    assert mcnemar_exact(3, 10) == pytest.approx(2 * (1 + 13 + 78 + 286) / 8192, abs=1e-15)
    assert mcnemar_exact(10, 3) == mcnemar_exact(3, 10)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(400, 450) < 0.1  # large counts stay exact (integer binomials)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_accuracy_test_takes_logits_or_ids():
    from spikingbert_sim.metrics import paired_accuracy_test

    labels = np.array([0, 1, 1, 0, 1])
    a = np.array([0, 1, 1, 0, 0])  # 4 right
    logits_b = np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0], [0.0, 1.0]])  # ids 0 1 0 1 1: 3 right
    r = paired_accuracy_test(a, logits_b, labels)
    assert (r["a_only"], r["b_only"], r["disagree"]) == (2, 1, 3)
    assert (r["accuracy_a"], r["accuracy_b"], r["difference"]) == (0.8, 0.6, pytest.approx(-0.2))
    assert r["p_value"] == 1.0  # 2 * P[Bin(3, 1/2) <= 1] = 2 * 4/8
    with pytest.raises(ValueError, match="predictions for"):
        paired_accuracy_test(a[:4], a, labels)
