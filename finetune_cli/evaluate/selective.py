"""Selective prediction: answering "unknown" below a confidence threshold.

A classifier shown a photo of none of its classes still names one, often
with a high probability. Rejecting predictions whose top (calibrated)
probability is below a threshold trades coverage (the share of images
answered) for accuracy on those answered: `coverage_curve` is that trade
on labelled held-out images. Given images of none of the classes
(`evaluate --unknown DIR`), `unknown_rejection` says what share of them
each threshold rejects, and `threshold_for_coverage` the threshold that
keeps a chosen share of the in-class images answered.
"""

from __future__ import annotations

import numpy as np

# Thresholds every report shows (the curve's own points are finer).
THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.5)


def coverage_curve(labels, probs) -> list[dict]:
    """Per threshold of `THRESHOLDS`: the share of images whose top
    probability reaches it (coverage) and the accuracy on them (None when
    none does)."""
    conf = np.asarray(probs).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    rows = []
    for t in THRESHOLDS:
        kept = conf >= t
        rows.append(
            {
                "threshold": t,
                "coverage": float(kept.mean()) if len(conf) else 0.0,
                "accuracy": float(correct[kept].mean()) if kept.any() else None,
            }
        )
    return rows


def accuracy_at_coverage(labels, probs) -> list[dict]:
    """For each coverage of `COVERAGES`: the accuracy on the most confident
    that share of the images, and the threshold that keeps them."""
    conf = np.asarray(probs).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    order = np.argsort(-conf, kind="stable")
    rows = []
    for c in COVERAGES:
        n = max(1, int(round(c * len(conf))))
        top = order[:n]
        rows.append(
            {
                "coverage": c,
                "threshold": float(conf[top].min()),
                "accuracy": float(correct[top].mean()),
            }
        )
    return rows


def threshold_for_coverage(in_class_conf, coverage: float) -> float:
    """The highest threshold that still answers at least `coverage` of the
    in-class images (their top probabilities `in_class_conf`)."""
    conf = np.sort(np.asarray(in_class_conf))[::-1]
    n = max(1, int(np.ceil(coverage * len(conf))))
    return float(conf[n - 1])


def unknown_rejection(in_class_conf, unknown_conf, coverage: float) -> dict:
    """What thresholds do to images of none of the classes: per threshold
    of `THRESHOLDS` the share of them rejected and of in-class images kept;
    and at the threshold that keeps `coverage` of the in-class images."""
    inside = np.asarray(in_class_conf)
    outside = np.asarray(unknown_conf)
    t = threshold_for_coverage(inside, coverage)
    return {
        "images": int(len(outside)),
        "coverage": coverage,
        "threshold": t,
        "rejected": float((outside < t).mean()) if len(outside) else None,
        "kept_in_class": float((inside >= t).mean()) if len(inside) else None,
        "mean_confidence_unknown": float(outside.mean()) if len(outside) else None,
        "mean_confidence_in_class": float(inside.mean()) if len(inside) else None,
        "by_threshold": [
            {
                "threshold": th,
                "rejected": float((outside < th).mean()) if len(outside) else None,
                "kept_in_class": float((inside >= th).mean()) if len(inside) else None,
            }
            for th in THRESHOLDS
        ],
    }
