"""Multi-label models (`task: multi_label`): thresholds, metrics and
per-label calibration, in NumPy.

A multi-label model answers a probability per label (a sigmoid each); an
image's answer is the set of labels at or above their thresholds.

- **Thresholds** are chosen per label on the validation split after
  calibration: the one that maximises the label's F1 there (the midpoints
  between its distinct scores are the candidates; ties go to the higher
  threshold, the fewer false alarms). A label with no positive image in
  val keeps 0.5. They are stored in the run (`thresholds.json`) and in
  every export's metadata, and used by evaluate and predict.
- **Metrics**: per label precision, recall, F1 (at its threshold) and
  average precision (AP, threshold-free, as scikit-learn computes it);
  micro and macro F1, mAP (the mean AP over the labels with a positive
  image), subset accuracy (the whole set right), Hamming loss, ECE and log
  loss over every (image, label) pair.
- **Calibration**: one temperature per label, each fitted on val by
  minimising that label's binary log loss of sigmoid(z / T), folded into
  the output layer's column of that label (kernel and bias divided by it:
  `calibration.fold_into` with one temperature per output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

THRESHOLDS_FILE = "thresholds.json"
_LOG_T = (np.log(0.05), np.log(20.0))
_EPS = 1e-7


def logits(probs) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def with_temperatures(probs, temperatures) -> np.ndarray:
    """sigmoid(logit(probs) / T), each label's column by its own T."""
    z = logits(probs) / np.asarray(temperatures, dtype=np.float64)[None, :]
    return 1.0 / (1.0 + np.exp(-z))


def _bce(z, y, t: float) -> float:
    p = np.clip(1.0 / (1.0 + np.exp(-z / t)), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperatures(y, probs) -> list[float]:
    """Per label, the temperature minimising its binary log loss (a
    golden-section search on log T); 1.0 for a label that is all positive
    or all negative in `y`, where any T > 0 only pushes to an extreme."""
    z, y = logits(probs), np.asarray(y, dtype=np.float64)
    out = []
    ratio = (np.sqrt(5) - 1) / 2
    for c in range(z.shape[1]):
        if y[:, c].min() == y[:, c].max():
            out.append(1.0)
            continue
        lo, hi = _LOG_T
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fa, fb = _bce(z[:, c], y[:, c], np.exp(a)), _bce(z[:, c], y[:, c], np.exp(b))
        for _ in range(60):
            if fa < fb:
                hi, b, fb = b, a, fa
                a = hi - ratio * (hi - lo)
                fa = _bce(z[:, c], y[:, c], np.exp(a))
            else:
                lo, a, fa = a, b, fb
                b = lo + ratio * (hi - lo)
                fb = _bce(z[:, c], y[:, c], np.exp(b))
        out.append(float(np.exp((lo + hi) / 2)))
    return out


def best_threshold(y, scores) -> tuple[float, float]:
    """(threshold, F1) maximising one label's F1; (0.5, F1 at 0.5) when it
    has no positive."""
    y, scores = np.asarray(y, dtype=bool), np.asarray(scores, dtype=np.float64)
    if not y.any():
        return 0.5, f1_at(y, scores, 0.5)
    distinct = np.unique(scores)
    candidates = np.concatenate([(distinct[:-1] + distinct[1:]) / 2, [distinct[0] / 2]])
    best_t, best_f1 = 0.5, -1.0
    for t in sorted(candidates, reverse=True):
        f1 = f1_at(y, scores, t)
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    return best_t, best_f1


def f1_at(y, scores, t: float) -> float:
    pred = np.asarray(scores) >= t
    tp = float(np.sum(pred & y))
    denom = float(pred.sum() + y.sum())
    return 2 * tp / denom if denom else 0.0


def choose_thresholds(y, probs) -> list[float]:
    y = np.asarray(y)
    return [best_threshold(y[:, c], probs[:, c])[0] for c in range(y.shape[1])]


def thresholds_record(y, probs, class_names, split: str = "val") -> dict:
    """What `thresholds.json` holds: per label its threshold, the F1 it
    gives on `split` and the number of positives there."""
    y = np.asarray(y)
    labels = {}
    for c, name in enumerate(class_names):
        t, f1 = best_threshold(y[:, c], probs[:, c])
        labels[name] = {"threshold": t, "f1": f1, "positives": int(y[:, c].sum())}
    return {
        "format": "finetune-cli-thresholds/1",
        "rule": "max F1 per label on the split (0.5 without positives)",
        "split": split,
        "images": int(len(y)),
        "labels": labels,
    }


def for_target(target) -> tuple[np.ndarray, Optional[Path]]:
    """A saved model's thresholds in output order (0.5 where none was
    chosen), from `thresholds.json` beside it, and that file (None when
    there is none)."""
    path = target.model_path.parent / THRESHOLDS_FILE
    if not path.is_file():
        return np.full(len(target.labels), 0.5), None
    from finetune_cli.files import read_json

    rec = read_json(path, todo="restore it, or train again to choose them")
    found = {k: float(v["threshold"]) for k, v in rec["labels"].items()}
    return np.array([found.get(c, 0.5) for c in target.labels], np.float64), path


def label_sets(probs, thresholds) -> np.ndarray:
    """bool [n, labels]: each label at or above its threshold."""
    return np.asarray(probs) >= np.asarray(thresholds)[None, :]


def average_precision(y, scores) -> float:
    """AP as scikit-learn's `average_precision_score`: the sum over
    thresholds of (recall step) x precision; NaN without positives."""
    y = np.asarray(y, dtype=bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    s, yt = np.asarray(scores)[order], y[order]
    # The last index of each distinct score (ties counted together).
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(yt)[ends]
    precision = tp / (ends + 1)
    recall = tp / y.sum()
    steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(steps * precision))


def mean_ap(y, probs) -> float:
    """mAP: the mean AP over the labels with a positive (0 without any)."""
    y = np.asarray(y) > 0.5
    ap = [average_precision(y[:, c], probs[:, c]) for c in range(y.shape[1])]
    ap = [a for a in ap if not np.isnan(a)]
    return float(np.mean(ap)) if ap else 0.0


def compute(y, probs, thresholds, class_names) -> dict:
    """Every number of a multi-label report."""
    y = np.asarray(y).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    pred = label_sets(probs, thresholds)
    tp = (pred & y).sum(axis=0).astype(float)
    fp = (pred & ~y).sum(axis=0).astype(float)
    fn = (~pred & y).sum(axis=0).astype(float)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    f1 = np.divide(
        2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0
    )
    ap = np.array([average_precision(y[:, c], probs[:, c]) for c in range(y.shape[1])])
    present = y.any(axis=0)
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    summary = {
        "map": float(np.nanmean(ap)) if present.any() else 0.0,
        "micro_f1": float(2 * tp.sum() / micro_den) if micro_den else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "subset_accuracy": float(np.mean(np.all(pred == y, axis=1))),
        "hamming_loss": float(np.mean(pred != y)),
        "log_loss": binary_log_loss(y, probs),
        "ece": binary_ece(y, probs),
    }
    return {
        "task": "multi_label",
        "summary": summary,
        "num_samples": int(len(y)),
        "classes": list(class_names),
        "thresholds": dict(zip(class_names, map(float, thresholds), strict=True)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "ap": None if np.isnan(ap[i]) else float(ap[i]),
                "threshold": float(thresholds[i]),
                "support": int(y[:, i].sum()),
            }
            for i, name in enumerate(class_names)
        },
    }


def binary_log_loss(y, probs) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-15, 1 - 1e-15)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def reliability(y, probs, bins: int = 15) -> list[dict]:
    """Per probability bin over every (image, label) pair: mean predicted
    probability, the share that are positive, and the count."""
    from finetune_cli.evaluate.metrics import reliability_bins

    return reliability_bins(probs, y, bins)


def binary_ece(y, probs, bins: int = 15) -> float:
    """ECE of the per-label probabilities: the count-weighted gap between
    predicted probability and the share of positives, per bin."""
    rows = reliability(y, probs, bins)
    total = sum(r["count"] for r in rows)
    return (
        float(
            sum(r["count"] * abs(r["confidence"] - r["accuracy"]) for r in rows) / total
        )
        if total
        else 0.0
    )


def calibration_summary(y, probs, temperatures) -> dict:
    """ECE and log loss before and after, from calibrated `probs`."""
    before = with_temperatures(probs, 1.0 / np.asarray(temperatures))
    return {
        "ece_before": binary_ece(y, before),
        "ece_after": binary_ece(y, probs),
        "log_loss_before": binary_log_loss(y, before),
        "log_loss_after": binary_log_loss(y, probs),
    }
