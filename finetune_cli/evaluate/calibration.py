"""Calibration: probabilities that mean what they say.

After training, one temperature T is fitted on the validation split by
minimising the negative log-likelihood of softmax(z / T) (Guo et al.,
2017: temperature scaling), z being the model's logits. It is folded into
the output layer (its kernel and bias divided by T: softmax((Wx + b) / T)
is softmax((W / T) x + b / T)), so `best.keras`, and every format
exported from it, gives calibrated probabilities with no extra layer and
no code of ours; the ranking of classes, and so accuracy, is unchanged.

A multi-label model (a sigmoid per label) gets one temperature per label
instead (`labelsets.fit_temperatures`), folded into that label's column,
and its per-label thresholds are chosen after it (`labelsets.py`), saved
in `thresholds.json`.

The run records it in `calibration.json`: the temperature, the split and
number of images it was fitted on, and ECE and log loss before and after
on them. Since the logits are log-probabilities up to a constant,
probabilities before calibration are recovered from those after it
(`with_temperature(p, 1 / T)`), which is how a report shows both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from finetune_cli.evaluate import metrics as metrics_lib

FILE = "calibration.json"
# The search interval of log T: T from 1/20 to 20.
_LOG_T = (np.log(0.05), np.log(20.0))


def with_temperature(probs, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature), row by row."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, 1.0))
    z = logp / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logp, labels, temperature: float) -> float:
    z = logp / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(probs, labels) -> float:
    """The temperature minimising the NLL of `labels` under the tempered
    `probs` (a golden-section search on log T, where the NLL is smooth
    and has one minimum for the temperatures that matter)."""
    labels = np.asarray(labels)
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, 1.0))
    lo, hi = _LOG_T
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(logp, labels, np.exp(a)), _nll(logp, labels, np.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(logp, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(logp, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def reliability(labels, probs, bins: int = 15) -> list[dict]:
    """Per confidence bin (the ECE's): its range, mean confidence,
    accuracy and number of images (empty bins left out)."""
    probs = np.asarray(probs)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    return metrics_lib.reliability_bins(probs.max(axis=1), correct, bins)


def summary(labels, probs, temperature: float) -> dict:
    """ECE and log loss before and after, from calibrated `probs`."""
    before = with_temperature(probs, 1.0 / temperature)
    return {
        "temperature": temperature,
        "ece_before": metrics_lib.expected_calibration_error(labels, before),
        "ece_after": metrics_lib.expected_calibration_error(labels, probs),
        "log_loss_before": metrics_lib.log_loss(labels, before),
        "log_loss_after": metrics_lib.log_loss(labels, probs),
    }


def fold_into(model, temperature: float, layer_name: str = "predictions") -> None:
    """Divide the output layer's kernel and bias by `temperature`: one for
    every output, or one per output (an array, each column by its own)."""
    if not np.isscalar(temperature):
        temperature = np.asarray(temperature, dtype="float32")
    layer = model.get_layer(layer_name)
    for w in layer.weights:
        w.assign(w.numpy() / temperature)


def read(run_dir) -> Optional[dict]:
    """A run's calibration record, or None (none fitted, or not a run)."""
    if run_dir is None:
        return None
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    from finetune_cli.files import read_json

    return read_json(
        path, todo="delete it (the model is calibrated; only the report needs it)"
    )


def record(labels, uncalibrated, temperature: float, split: str) -> dict:
    """What `calibration.json` holds for a fit on `split`."""
    calibrated = with_temperature(uncalibrated, temperature)
    return {
        "method": "temperature",
        "split": split,
        "images": int(len(labels)),
        **summary(labels, calibrated, temperature),
    }


def calibrate(model, dataset, split: str = "val") -> dict:
    """Fit the temperature on `dataset` ((images, one-hot) batches), fold
    it into `model` and return the record for `calibration.json`."""
    # `predict` over the dataset (not batch by batch): under a strategy it
    # gathers the replicas' outputs in the dataset's order.
    probs = np.asarray(model.predict(dataset, verbose=0))
    labels = np.concatenate([np.argmax(np.asarray(y), axis=1) for _, y in dataset])
    temperature = fit_temperature(probs, labels)
    fold_into(model, temperature)
    return {**record(labels, probs, temperature, split), "model": "best.keras"}


def after_training(model, dataset, method: str, class_names, multi_label: bool):
    """What a run does with its best model once trained: calibrate it
    (unless `method` is "none") and, for multi-label, choose the
    thresholds after. Returns [(file name, record, line to show)]."""
    if not multi_label:
        if method == "none":
            return []
        rec = calibrate(model, dataset)
        return [(FILE, rec, describe(rec))]
    from finetune_cli.evaluate import labelsets

    probs = np.asarray(model.predict(dataset, verbose=0), dtype=np.float64)
    y = np.concatenate([np.asarray(t) for _, t in dataset]) > 0.5
    found = []
    if method != "none":
        temps = labelsets.fit_temperatures(y, probs)
        fold_into(model, temps)
        probs = labelsets.with_temperatures(probs, temps)
        rec = {
            "method": "temperature",
            "per_label": True,
            "split": "val",
            "images": int(len(y)),
            "temperatures": dict(zip(class_names, temps, strict=True)),
            **labelsets.calibration_summary(y, probs, temps),
            "model": "best.keras",
        }
        rec["temperature"] = float(np.exp(np.mean(np.log(temps))))
        found.append((FILE, rec, describe(rec)))
    th = labelsets.thresholds_record(y, probs, class_names)
    mean_f1 = np.mean([v["f1"] for v in th["labels"].values()])
    found.append(
        (
            labelsets.THRESHOLDS_FILE,
            th,
            f"thresholds: one per label, max F1 on val ({th['images']} images): "
            f"mean F1 {mean_f1:.4f}",
        )
    )
    return found


def describe(rec: dict) -> str:
    if rec.get("per_label"):
        return (
            f"calibration: a temperature per label (geometric mean "
            f"{rec['temperature']:.3f}) fitted on {rec['split']} "
            f"({rec['images']} images): ECE {rec['ece_before']:.4f} -> "
            f"{rec['ece_after']:.4f}, log loss {rec['log_loss_before']:.4f} -> "
            f"{rec['log_loss_after']:.4f}"
        )
    return (
        f"calibration: temperature {rec['temperature']:.3f} fitted on "
        f"{rec['split']} ({rec['images']} images): ECE {rec['ece_before']:.4f} "
        f"-> {rec['ece_after']:.4f}, log loss {rec['log_loss_before']:.4f} -> "
        f"{rec['log_loss_after']:.4f}"
    )


def for_target(target) -> Optional[dict]:
    """The calibration record of the run `target`'s model was calibrated
    by (its best.keras), or None."""
    rec = read(target.run_dir)
    if rec is None or target.model_path.name != rec.get("model", "best.keras"):
        return None
    return rec
