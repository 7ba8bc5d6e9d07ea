"""NumPy metrics against scikit-learn and by hand; top-k clamping."""

import numpy as np
import pytest

from finetune_cli.evaluate import metrics


def test_numpy_metrics_equal_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    n, c = 200, 5
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y] * rng.uniform(0, 1, (n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = list("abcde")
    m = metrics.compute_metrics(y, probs, names, top_k=3)
    pred = probs.argmax(1)
    assert m["summary"]["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert m["summary"]["top_k_accuracy"] == pytest.approx(
        sk.top_k_accuracy_score(y, probs, k=3, labels=range(c))
    )
    assert m["summary"]["log_loss"] == pytest.approx(
        sk.log_loss(y, probs, labels=range(c))
    )
    np.testing.assert_array_equal(m["confusion_matrix"], sk.confusion_matrix(y, pred))
    p, r, f, s = sk.precision_recall_fscore_support(y, pred, zero_division=0)
    for i, name in enumerate(names):
        got = m["per_class"][name]
        assert (
            got["precision"],
            got["recall"],
            got["f1"],
            got["support"],
        ) == pytest.approx((p[i], r[i], f[i], s[i]))
    for avg in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(
            y, pred, average=avg, zero_division=0
        )
        assert m["summary"][f"{avg}_precision"] == pytest.approx(p)
        assert m["summary"][f"{avg}_recall"] == pytest.approx(r)
        assert m["summary"][f"{avg}_f1"] == pytest.approx(f)
    cm = np.array(m["confusion_matrix"])
    worst = m["most_confused"][0]
    i, j = names.index(worst["true"]), names.index(worst["predicted"])
    assert worst["count"] == cm[~np.eye(c, dtype=bool)].max() == cm[i, j]


def test_ece_by_hand():
    # Four predictions at confidence 0.8, two right: |0.5 - 0.8| = 0.3.
    probs = np.array([[0.8, 0.2]] * 4)
    y = np.array([0, 0, 1, 1])
    assert metrics.expected_calibration_error(y, probs) == pytest.approx(0.3)
    # Perfectly calibrated: confidence 1.0, all right.
    assert metrics.expected_calibration_error(
        np.array([0, 1]), np.eye(2)
    ) == pytest.approx(0.0)


def test_top_k_is_clamped_below_the_number_of_classes():
    # A model that gives the true class the lowest score: top-4 of 4 classes
    # would still call it right every time.
    y = np.array([0, 1, 2, 3])
    probs = np.full((4, 4), 1 / 3)
    probs[np.arange(4), y] = 0.0
    m = metrics.compute_metrics(y, probs, list("abcd"), top_k=5)
    assert m["top_k"] == 3 and m["top_k_requested"] == 5
    assert m["summary"]["top_k_accuracy"] == 0.0
    assert metrics.effective_top_k(2, 4) == 2
    assert metrics.effective_top_k(5, 2) == 1
