"""Quality gates on evaluation metrics, for CI and promotion.

`--fail-under`/`--fail-over` compare the summary metrics with thresholds;
`--compare-to` compares with another model on the images neither model
trained or validated on. A failed gate raises `GateError` (exit 4) after
`gates.json` is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Optional

import numpy as np

from finetune_cli.run import tracking
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.errors import GateError
from finetune_cli.errors import did_you_mean
from finetune_cli.evaluate.metrics import LOWER_IS_BETTER
from finetune_cli.evaluate.metrics import METRIC_KEYS
from finetune_cli.evaluate.metrics import compute_metrics
from finetune_cli.evaluate.prediction import predict_files
from finetune_cli.files import write_json
from finetune_cli.model.saved import load_model
from finetune_cli.model.saved import resolve_target

if TYPE_CHECKING:
    from finetune_cli.evaluate.report import Evaluation
    from finetune_cli.model.saved import Target


def parse_gates(items, option: str) -> dict[str, float]:
    """`metric=value` strings into a dict, checking the metric names."""
    gates = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{option} expects METRIC=VALUE. Received: {item!r}")
        if key not in METRIC_KEYS:
            raise ConfigError(
                f"{option}: unknown metric{did_you_mean(key, METRIC_KEYS)}; expected "
                f"one of {', '.join(METRIC_KEYS)}. Received: {key!r}"
            )
        if option == "--fail-under" and key in LOWER_IS_BETTER:
            raise ConfigError(
                f"--fail-under {key}: lower is better for {key}; "
                f"use --fail-over {key}=VALUE"
            )
        try:
            gates[key] = float(value)
        except ValueError:
            raise ConfigError(
                f"{option} {key}: expected a number. Received: {value!r}"
            ) from None
    return gates


def check_gates(summary: dict, fail_under: dict, fail_over: dict) -> list[str]:
    """Messages for every failed gate (empty when all pass)."""
    failed = []
    absent = [k for k in (*fail_under, *fail_over) if k not in summary]
    if absent:
        kind = "multi-label" if "map" in summary else "single-label"
        raise ConfigError(
            f"gate on {', '.join(absent)}: not measured for this {kind} model; "
            f"its metrics are {', '.join(summary)}. Received: {absent[0]!r}"
        )
    for key, threshold in fail_under.items():
        value = summary[key]
        if value < threshold:
            failed.append(
                f"{key} {value:.4f} < {threshold:g} (short by {threshold - value:.4f})"
            )
    for key, threshold in fail_over.items():
        value = summary[key]
        if value > threshold:
            failed.append(
                f"{key} {value:.4f} > {threshold:g} (over by {value - threshold:.4f})"
            )
    return failed


def compare(new: dict, old: dict, metric: str, tolerance: float) -> Optional[str]:
    """A message when `new` is worse than `old` by more than `tolerance`."""
    a, b = new["summary"][metric], old["summary"][metric]
    worse = a > b + tolerance if metric in LOWER_IS_BETTER else a < b - tolerance
    if worse:
        return (
            f"{metric} {a:.4f} is worse than the reference's {b:.4f} by "
            f"{abs(a - b):.4f} (tolerance {tolerance:g})"
        )
    return None


def compare_unseen(
    ev: Evaluation, other: Target, metric: str, tolerance: float, batch_size: int = 32
):
    """Compare `ev`'s model with `other` on the images of `ev` that `other`
    neither trained nor validated on (by content), so neither model is
    scored on its own training data.

    Returns (a message when `ev`'s model is worse, or None; a record).
    """
    from finetune_cli.data import split as split_lib

    if metric == "accuracy" and ev.metrics.get("task") == "multi_label":
        metric = "map"  # the default metric, for a multi-label model
    keep = split_lib.unseen_by(other.run_dir, ev.files)
    record = {
        "model": str(other.model_path),
        "metric": metric,
        "tolerance": tolerance,
        "images": len(keep),
        "left_out_seen_by_reference": len(ev.files) - len(keep),
    }
    if not keep:
        return (
            f"{other.model_path} trained or validated on every one of "
            "these images, so the two cannot be compared fairly"
        ), record
    from finetune_cli.evaluate.evaluation import score

    labels = np.asarray(ev.labels)[keep]
    top_k = ev.metrics.get("top_k", 5)
    # The new model at its own thresholds (multi-label), the old at its.
    new = ev.metrics
    if len(keep) != len(ev.files):
        new = {"summary": _rescored(ev, keep, labels, top_k)}
    probs = predict_files(
        load_model(other),
        [ev.files[i] for i in keep],
        batch_size,
        ev.metrics.get("tta", "none"),  # both scored the same way
    )
    old = score(labels, probs, other, top_k)
    if metric not in old["summary"]:
        raise ConfigError(
            f"--compare-metric {metric}: not measured for these models; their "
            f"metrics are {', '.join(old['summary'])}. Received: {metric!r}"
        )
    record.update(
        value=old["summary"][metric],
        new_value=new["summary"][metric],
        metrics=old["summary"],
        new_metrics=new["summary"],
    )
    return compare(new, old, metric, tolerance), record


def _rescored(ev: Evaluation, keep, labels, top_k) -> dict:
    """`ev`'s summary on the images `keep` only."""
    probs = ev.probs[keep]
    if ev.metrics.get("task") == "multi_label":
        from finetune_cli.evaluate import labelsets

        th = [ev.metrics["thresholds"][c] for c in ev.metrics["classes"]]
        return labelsets.compute(labels, probs, th, ev.metrics["classes"])["summary"]
    return compute_metrics(labels, probs, ev.metrics["classes"], top_k)["summary"]


def gate(
    ev: Evaluation,
    *,
    fail_under=None,
    fail_over=None,
    compare_to=None,
    tolerance=0.005,
    compare_metric="accuracy",
    batch_size=32,
) -> dict:
    """Apply the gates; write `gates.json`; raise GateError when one fails."""
    failed = check_gates(ev.metrics["summary"], fail_under or {}, fail_over or {})
    record = {"fail_under": fail_under or {}, "fail_over": fail_over or {}}
    if compare_to is not None:
        other_target = resolve_target(compare_to)
        if other_target.labels != ev.metrics["classes"]:
            raise DataError(
                f"--compare-to {compare_to}: its classes "
                f"{other_target.labels} differ from {ev.metrics['classes']}"
            )
        message, record["compare_to"] = compare_unseen(
            ev, other_target, compare_metric, tolerance, batch_size
        )
        if message:
            failed.append(message)
    record["failed"] = failed
    record["passed"] = not failed
    if ev.out_dir.is_dir():
        write_json(ev.out_dir / "gates.json", record)
        tracking.attach(
            ev.run_dir, ev.out_dir / "gates.json", f"eval/{ev.out_dir.name}"
        )
    if failed:
        raise GateError("; ".join(failed))
    return record
