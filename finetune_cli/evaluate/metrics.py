"""Classification metrics from labels and predicted probabilities (NumPy).

`compute_metrics` gives every number of an evaluation report; the functions
are checked against scikit-learn in the tests. `summary` holds the flat
numbers the gates read (see `METRIC_KEYS`).
"""

from __future__ import annotations

import math

import numpy as np

# Metrics where lower is better: `--fail-under` makes no sense for them.
LOWER_IS_BETTER = {"log_loss", "ece", "hamming_loss"}
# Multi-label models' summary (`labelsets.compute`): map, micro_f1,
# subset_accuracy, hamming_loss, with macro_f1, log_loss and ece.
MULTI_LABEL_KEYS = (
    "map",
    "micro_f1",
    "macro_f1",
    "subset_accuracy",
    "hamming_loss",
    "log_loss",
    "ece",
)
METRIC_KEYS = (
    "accuracy",
    "top_k_accuracy",
    "log_loss",
    "ece",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
    "map",
    "micro_f1",
    "subset_accuracy",
    "hamming_loss",
)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class_scores(cm: np.ndarray) -> dict:
    """Precision, recall, F1 and support per class (0 where undefined)."""
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    support = cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(
        2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0
    )
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.astype(np.int64),
    }


def effective_top_k(k: int, num_classes: int) -> int:
    """`k` clamped below the number of classes (at least 1).

    With k >= the number of classes every label is in the top k, so top-k
    accuracy would be 1.0 whatever the model does.
    """
    return max(1, min(k, num_classes - 1))


def top_k_accuracy(y_true, probs, k: int) -> float:
    k = effective_top_k(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(y_true)[:, None], axis=1)))


def log_loss(y_true, probs, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood of the true class (rows renormalised)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    true_p = p[np.arange(len(p)), np.asarray(y_true)]
    return float(-np.mean(np.log(np.clip(true_p, eps, 1.0))))


def expected_calibration_error(y_true, probs, bins: int = 15) -> float:
    """ECE over equal-width confidence bins (Guo et al., 2017)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def reliability_bins(confidence, hit, bins: int = 15) -> list[dict]:
    """Per equal-width bin of `confidence` (the first bin includes 0): its
    range, the mean confidence, the share of `hit` and the count (empty
    bins left out): the rows of a reliability diagram and of the ECE."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(hit, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        inside = (conf >= lo) & (conf <= hi) if i == 0 else (conf > lo) & (conf <= hi)
        if inside.any():
            rows.append(
                {
                    "low": float(lo),
                    "high": float(hi),
                    "confidence": float(conf[inside].mean()),
                    "accuracy": float(hit[inside].mean()),
                    "count": int(inside.sum()),
                }
            )
    return rows


def compute_metrics(y_true, probs, class_names, top_k: int = 5) -> dict:
    """Every metric of the report from labels and predicted probabilities."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, c)
    scores = per_class_scores(cm)
    support = scores["support"]
    weights = support / support.sum() if support.sum() else np.zeros(c)
    present = support > 0
    summary = {
        "accuracy": float(np.mean(y_pred == y_true)),
        "top_k_accuracy": top_k_accuracy(y_true, probs, top_k),
        "log_loss": log_loss(y_true, probs),
        "ece": expected_calibration_error(y_true, probs),
    }
    for key in ("precision", "recall", "f1"):
        # Macro over the classes present in the data, as scikit-learn does
        # with `labels=` the present ones.
        summary[f"macro_{key}"] = (
            float(scores[key][present].mean()) if present.any() else 0.0
        )
        summary[f"weighted_{key}"] = float((scores[key] * weights).sum())
    row_sums = cm.sum(axis=1, keepdims=True)
    normalized = np.divide(cm, row_sums, out=np.zeros(cm.shape), where=row_sums > 0)
    off = [
        (int(cm[i, j]), i, j)
        for i in range(c)
        for j in range(c)
        if i != j and cm[i, j] > 0
    ]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    return {
        "summary": summary,
        "top_k": effective_top_k(top_k, c),
        "top_k_requested": int(top_k),
        "num_samples": int(n),
        "classes": list(class_names),
        "per_class": {
            name: {
                "precision": float(scores["precision"][i]),
                "recall": float(scores["recall"][i]),
                "f1": float(scores["f1"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": normalized.round(6).tolist(),
        "most_confused": [
            {
                "true": class_names[i],
                "predicted": class_names[j],
                "count": k,
                "fraction_of_true": float(normalized[i, j]),
            }
            for k, i, j in off[:10]
        ],
    }


def fmt(value) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.4f}"
    )
