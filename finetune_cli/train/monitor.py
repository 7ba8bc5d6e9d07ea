"""Which epoch is best: the monitor's direction and its tie-break."""

from __future__ import annotations

import math


def lower_is_better(monitor: str) -> bool:
    """Keras' own rule for `mode="auto"`: losses and errors go down."""
    return "loss" in monitor or "error" in monitor


def improved(monitor: str, row: dict, history: list, best_epoch) -> bool:
    """Is epoch `row` better than `best_epoch` (a row of `history`)?

    Better on the monitor, or equal on it and better on the other metric
    (`val_accuracy` ties go to the lower `val_loss`, `val_loss` ties to the
    higher `val_accuracy`): with few validation images accuracy ties are
    common, and the first of them is not the best model.
    """
    value = row.get(monitor)
    if value is None or math.isnan(value):
        return False
    if best_epoch is None:
        return True
    best = next(r for r in history if r["epoch"] == best_epoch)
    if value != best[monitor]:
        return better(monitor, value, best[monitor])
    other = TIE_BREAK.get(monitor)
    if other is None or row.get(other) is None or best.get(other) is None:
        return False
    return better(other, row[other], best[other])


def better(metric: str, value: float, than: float) -> bool:
    if lower_is_better(metric):
        return value < than
    return value > than


TIE_BREAK = {
    "val_accuracy": "val_loss",
    "val_map": "val_loss",
    "val_loss": "val_accuracy",
    "accuracy": "loss",
    "loss": "accuracy",
}
