"""Evaluation: held-out metrics, reports, quality gates, batch prediction.

`evaluate(...)` runs a saved model of ours on held-out images and writes into
its output folder (default `RUN_DIR/eval/<name>/`):

| file | content |
| --- | --- |
| `metrics.json` | the metrics below, with stable keys (see `METRIC_KEYS`) |
| `per_class.csv` | class, precision, recall, f1, support |
| `predictions.csv` | file, true, predicted, confidence, top_k (label:prob;...) |
| `confusion_matrix.png` | counts and row-normalised, side by side |
| `curves.png` | loss and accuracy per epoch with phase boundaries (runs only) |
| `report.html` | one self-contained page: all of the above and the worst |
|               | misclassified images as thumbnails |

`metrics.json` keys: `summary` (flat numbers the gates read:
accuracy, top_k_accuracy, log_loss, ece, macro_/weighted_ precision, recall,
f1), `per_class`, `confusion_matrix`, `confusion_matrix_normalized`,
`most_confused`, `classes`, `num_samples`, `top_k`, `model`, `data`,
`split`.

The metric functions are NumPy only and are checked against scikit-learn in
the tests.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from finetune_cli import data as data_lib
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.errors import GateError
from finetune_cli.rundir import atomic_write
from finetune_cli.rundir import write_json

# Metrics where lower is better: `--fail-under` makes no sense for them.
LOWER_IS_BETTER = {"log_loss", "ece"}
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
)


# --------------------------------------------------------------------------
# Metrics (NumPy)
# --------------------------------------------------------------------------


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


def top_k_accuracy(y_true, probs, k: int) -> float:
    k = min(k, probs.shape[1])
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
        "top_k": min(top_k, c),
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


# --------------------------------------------------------------------------
# Loading models and data
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """A model to evaluate: the file, its labels, and its run folder if any."""

    model_path: Path
    labels: list[str]
    run_dir: Optional[Path]


def resolve_target(path) -> Target:
    """A run folder (uses best.keras) or a .keras file with labels.txt beside.

    Raises:
        ConfigError: the path is neither, or labels.txt is missing.
    """
    path = Path(path)
    if path.is_dir():
        model_path = path / "best.keras"
        if not model_path.is_file():
            raise ConfigError(f"{path} is not a finished run folder: no best.keras")
        run_dir = path
    elif path.is_file() and path.suffix == ".keras":
        model_path, run_dir = path, None
        if (path.parent / "config.yaml").is_file():
            run_dir = path.parent
    else:
        raise ConfigError(f"expected a run folder or a .keras file. Received: {path}")
    labels_path = model_path.parent / "labels.txt"
    if not labels_path.is_file():
        raise ConfigError(
            f"no labels.txt beside {model_path}; the class names "
            "are needed to read the model's outputs"
        )
    labels = [la.strip() for la in labels_path.read_text().splitlines() if la.strip()]
    return Target(model_path, labels, run_dir)


def load_model(target: Target):
    import keras

    try:
        return keras.saving.load_model(target.model_path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - report any load failure plainly
        text = str(e)
        if "safe_mode" in text or "Lambda" in text:
            raise ConfigError(
                f"refusing to load {target.model_path}: it contains a Lambda "
                "layer or other Python code, and finetune-cli only loads "
                "models in Keras safe mode, so no code from a model file "
                "runs. Rebuild the model from standard Keras layers (as "
                "finetune-cli's own models are) and save it again"
            ) from None
        raise ConfigError(
            f"cannot load {target.model_path}: {text.splitlines()[0] if text else e}"
        ) from None


def model_image_size(model) -> tuple[int, int]:
    shape = model.input_shape
    return int(shape[1]), int(shape[2])


def resolve_data(
    target: Target,
    *,
    config=None,
    data=None,
    split="test",
    seed: Optional[int] = None,
    allow_missing: bool = False,
    warn=None,
):
    """The (path, class name) pairs to evaluate and a description of them.

    Precedence: `data` (a folder of class folders, a folder with train/val/
    test, or a CSV) > `config` > the run's recorded split (split.json: the
    files the run held out, checked by content hash; files added to the
    data folder since never enter it).
    """
    from finetune_cli import config as config_lib
    from finetune_cli import split as split_lib

    if data is not None:
        data = Path(data)
        if data.suffix.lower() == ".csv":
            section = config_lib.Data(csv=str(data))
        else:
            section = config_lib.Data(dir=str(data))
        if not data.exists():
            raise DataError(f"--data: not found: {data}")
        if data.is_file() and data.suffix.lower() != ".csv":
            raise DataError(
                f"--data {data} is a file; expected a folder of "
                "class folders or a .csv manifest"
            )
        if data.is_dir() and data.suffix.lower() == ".csv":
            raise DataError(f"--data {data} is a folder; expected a .csv file")
        if data.is_dir() and not (data / "train").is_dir():
            # A plain folder of class folders: every image is held out.
            index = data_lib.index_whole_folder(data, "--data")
            return _pairs(index, "all"), f"{data}", "all"
        index = data_lib.index_data(section, seed if seed is not None else 42)
        return _pairs(index, split), str(data), split
    if config is None:
        if target.run_dir is None or not (target.run_dir / "config.yaml").is_file():
            raise ConfigError(
                "no data to evaluate on: pass --data DIR|CSV or "
                "--config CONFIG (or a run folder)"
            )
        recorded = split_lib.load(
            target.run_dir, [split], allow_missing=allow_missing, warn=warn
        )
        if recorded is not None:
            if split not in recorded.splits:
                raise DataError(
                    f"--split {split}: the run recorded no {split} split (it "
                    f"has {', '.join(split_lib.read(target.run_dir)['files'])})"
                    "; pass --split val or --data DIR"
                )
            source = (
                f"{recorded.source} (split recorded in "
                f"{target.run_dir / split_lib.FILE})"
            )
            return _pairs(recorded, split), source, split
        if warn is not None:
            warn(
                f"{target.run_dir} has no recorded file list (made by an "
                "older finetune-cli): splitting its data folder again, which "
                "is only the same split if the folder has not changed"
            )
        config = config_lib.load_config(target.run_dir / "config.yaml")
    index = data_lib.index_data(config.data, config.experiment.seed)
    if split not in index.splits:
        raise DataError(
            f"--split {split}: the data has no {split} split (it has "
            f"{', '.join(index.splits)}); pass --split val or --data DIR"
        )
    return _pairs(index, split), index.source, split


def _pairs(index, split):
    return [(p, index.class_names[lb]) for p, lb in index.splits.get(split, [])]


def align_labels(pairs, model_classes) -> list[tuple[str, int]]:
    """Map class names in the data to the model's output indices.

    Raises:
        DataError: classes the model does not know, or model classes the
            data does not have, named.
    """
    data_classes = sorted({c for _, c in pairs})
    unknown = [c for c in data_classes if c not in model_classes]
    missing = [c for c in model_classes if c not in data_classes]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"classes in the data that the model does not know: {unknown}")
        if missing:
            parts.append(f"model classes with no images in the data: {missing}")
        raise DataError(
            "class mismatch between model and data: "
            + "; ".join(parts)
            + f". Model classes: {list(model_classes)}"
        )
    return [(p, model_classes.index(c)) for p, c in pairs]


def predict_files(model, paths, batch_size: int = 32):
    """Probabilities for each file (decoded and resized as in training)."""
    import tensorflow as tf

    size = model_image_size(model)
    ds = (
        tf.data.Dataset.from_tensor_slices(list(paths))
        .map(
            lambda p: data_lib.load_image(p, size),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    try:
        return np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
    except tf.errors.InvalidArgumentError:
        bad = data_lib.find_unreadable(paths)
        if not bad:
            raise
        raise DataError(
            "image(s) could not be decoded: "
            + "; ".join(f"{p}: {why}" for p, why in bad)
        ) from None


# --------------------------------------------------------------------------
# Evaluate
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Evaluation:
    metrics: dict
    out_dir: Path
    probs: np.ndarray
    labels: np.ndarray
    files: list[str]


def evaluate(
    target_path,
    *,
    config=None,
    data=None,
    split="test",
    out=None,
    name=None,
    top_k=5,
    write=True,
    batch_size=32,
    allow_missing=False,
    warn=None,
) -> Evaluation:
    """Evaluate a run or model on held-out images and write the report.

    A run folder is evaluated on its recorded split (see `resolve_data`);
    `allow_missing` leaves out recorded files that vanished or changed
    (reported through `warn`) instead of stopping.
    """
    target = resolve_target(target_path)
    pairs, source, split = resolve_data(
        target,
        config=config,
        data=data,
        split=split,
        allow_missing=allow_missing,
        warn=warn,
    )
    if not pairs:
        raise DataError(f"no images to evaluate in {source} ({split})")
    samples = align_labels(pairs, target.labels)
    model = load_model(target)
    n_out = int(model.output_shape[-1])
    if n_out != len(target.labels):
        raise DataError(
            f"{target.model_path} has {n_out} outputs but labels.txt "
            f"lists {len(target.labels)} classes"
        )
    files = [p for p, _ in samples]
    labels = np.array([lb for _, lb in samples])
    probs = predict_files(model, files, batch_size)
    metrics = compute_metrics(labels, probs, target.labels, top_k)
    metrics.update(model=str(target.model_path), data=source, split=split)
    if out is None:
        base = target.run_dir or target.model_path.parent
        out = Path(base) / "eval" / (name or split)
    out = Path(out)
    result = Evaluation(metrics, out, probs, labels, files)
    if write:
        write_report(result, target)
    return result


def write_report(ev: Evaluation, target: Target) -> None:
    out = ev.out_dir
    out.mkdir(parents=True, exist_ok=True)
    m = ev.metrics
    classes = m["classes"]
    write_json(out / "metrics.json", m)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "precision", "recall", "f1", "support"])
    for name, s in m["per_class"].items():
        w.writerow(
            [
                name,
                f"{s['precision']:.6f}",
                f"{s['recall']:.6f}",
                f"{s['f1']:.6f}",
                s["support"],
            ]
        )
    atomic_write(out / "per_class.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "true", "predicted", "confidence", "top_k"])
    k = m["top_k"]
    for f, y, p in zip(ev.files, ev.labels, ev.probs, strict=True):
        top = np.argsort(-p, kind="stable")[:k]
        w.writerow(
            [
                f,
                classes[y],
                classes[int(p.argmax())],
                f"{p.max():.6f}",
                ";".join(f"{classes[i]}:{p[i]:.6f}" for i in top),
            ]
        )
    atomic_write(out / "predictions.csv", buf.getvalue())
    from finetune_cli import faults

    faults.point("report")
    from finetune_cli import plots

    plots.confusion_matrix_png(
        np.array(m["confusion_matrix"]), classes, out / "confusion_matrix.png"
    )
    history = target.run_dir / "history.csv" if target.run_dir else None
    curves = None
    if history is not None and history.is_file():
        curves = out / "curves.png"
        plots.curves_png(history, curves)
    atomic_write(out / "report.html", render_html(ev, curves))


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _thumbnail(path: str, size: int = 96) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            b = io.BytesIO()
            im.save(b, "JPEG", quality=85)
    except Exception:  # noqa: BLE001 - a thumbnail is best effort
        return "<span>(unreadable)</span>"
    return (
        '<img src="data:image/jpeg;base64,'
        + base64.b64encode(b.getvalue()).decode()
        + '">'
    )


def worst_mistakes(ev: Evaluation, limit: int = 24):
    """Misclassified images, most confident mistakes first."""
    pred = ev.probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != ev.labels)
    order = wrong[np.argsort(-ev.probs[wrong, pred[wrong]], kind="stable")]
    return [
        (ev.files[i], int(ev.labels[i]), int(pred[i]), float(ev.probs[i, pred[i]]))
        for i in order[:limit]
    ]


def render_html(ev: Evaluation, curves: Optional[Path]) -> str:
    m = ev.metrics
    s = m["summary"]
    classes = m["classes"]
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{v:.4f}</td></tr>" for k, v in s.items())
    per_class = "".join(
        f"<tr><td>{e(c)}</td><td>{v['precision']:.4f}</td><td>{v['recall']:.4f}"
        f"</td><td>{v['f1']:.4f}</td><td>{v['support']}</td></tr>"
        for c, v in m["per_class"].items()
    )
    confused = (
        "".join(
            f"<tr><td>{e(p['true'])}</td><td>{e(p['predicted'])}</td>"
            f"<td>{p['count']}</td><td>{p['fraction_of_true']:.3f}</td></tr>"
            for p in m["most_confused"]
        )
        or '<tr><td colspan="4">none</td></tr>'
    )
    mistakes = (
        "".join(
            f"<figure>{_thumbnail(f)}<figcaption>{e(Path(f).name)}<br>true "
            f"<b>{e(classes[t])}</b><br>pred <b>{e(classes[p])}</b> ({c:.2f})"
            f"</figcaption></figure>"
            for f, t, p, c in worst_mistakes(ev)
        )
        or "<p>No misclassified images.</p>"
    )
    curves_html = (
        _img_tag(curves, "training curves")
        if curves is not None
        else "<p>No training history (not a run folder).</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>finetune-cli evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 4px; text-align: center; font-size: 11px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Evaluation</h1>
<p>Model: <code>{e(m["model"])}</code><br>Data: <code>{e(str(m["data"]))}</code>
 (split {e(m["split"])}), {m["num_samples"]} images, {len(classes)} classes.</p>
<h2 id="summary">Summary</h2>
<table><tr><th>metric</th><th>value</th></tr>{rows}</table>
<h2 id="per-class">Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr>
{per_class}</table>
<h2 id="confusion">Confusion matrix</h2>
{_img_tag(ev.out_dir / "confusion_matrix.png", "confusion matrix")}
<h2 id="most-confused">Most confused pairs</h2>
<table><tr><th>true</th><th>predicted</th><th>count</th><th>fraction of true</th></tr>
{confused}</table>
<h2 id="curves">Training curves</h2>
{curves_html}
<h2 id="mistakes">Worst misclassified images</h2>
<div>{mistakes}</div>
</body></html>
"""


# --------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------


def parse_gates(items, option: str) -> dict[str, float]:
    """`metric=value` strings into a dict, checking the metric names."""
    gates = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{option} expects METRIC=VALUE. Received: {item!r}")
        if key not in METRIC_KEYS:
            from finetune_cli.errors import did_you_mean

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
    from finetune_cli import split as split_lib

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
    labels = np.asarray(ev.labels)[keep]
    new = compute_metrics(labels, ev.probs[keep], other.labels, ev.metrics["top_k"])
    probs = predict_files(load_model(other), [ev.files[i] for i in keep], batch_size)
    old = compute_metrics(labels, probs, other.labels, ev.metrics["top_k"])
    record.update(
        value=old["summary"][metric],
        new_value=new["summary"][metric],
        metrics=old["summary"],
        new_metrics=new["summary"],
    )
    return compare(new, old, metric, tolerance), record


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
    if failed:
        raise GateError("; ".join(failed))
    return record


# --------------------------------------------------------------------------
# Predict
# --------------------------------------------------------------------------


def collect_images(inputs) -> list[str]:
    """Image files from paths and folders (recursively), in a stable order."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(
                str(f)
                for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in data_lib.IMAGE_EXTENSIONS
            )
        elif p.is_file():
            files.append(str(p))
        else:
            raise DataError(f"not found: {p}")
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    return files


def predict(target_path, inputs, *, top_k=3, batch_size=32):
    """Predictions for image files: rows of file, label, confidence, top_k.

    Unreadable images get a row with `error` set and no prediction.
    """
    import tensorflow as tf

    target = resolve_target(target_path)
    model = load_model(target)
    files = collect_images(inputs)
    size = model_image_size(model)
    rows, good, images = [], [], []
    for f in files:
        try:
            images.append(np.asarray(data_lib.load_image(f, size)))
            good.append(f)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            rows.append({"file": f, "error": data_lib.decode_failure(f, e)})
    probs = {}
    for i in range(0, len(images), batch_size):
        batch = np.stack(images[i : i + batch_size])
        for f, p in zip(
            good[i : i + batch_size], model.predict(batch, verbose=0), strict=True
        ):
            probs[f] = np.asarray(p, dtype=np.float64)
    k = min(top_k, len(target.labels))
    out = []
    errors = {r["file"]: r["error"] for r in rows}
    for f in files:
        if f in errors:
            out.append(
                {
                    "file": f,
                    "label": None,
                    "confidence": None,
                    "top_k": [],
                    "error": errors[f],
                }
            )
            continue
        p = probs[f]
        top = np.argsort(-p, kind="stable")[:k]
        out.append(
            {
                "file": f,
                "label": target.labels[int(top[0])],
                "confidence": float(p[top[0]]),
                "top_k": [
                    {"label": target.labels[int(i)], "probability": float(p[i])}
                    for i in top
                ],
                "error": None,
            }
        )
    return out


def write_predictions(rows, path) -> None:
    path = Path(path)
    if path.suffix.lower() == ".json":
        atomic_write(path, json.dumps(rows, indent=2) + "\n")
        return
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"--out must end in .csv or .json. Received: {path}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "label", "confidence", "top_k", "error"])
    for r in rows:
        w.writerow(
            [
                r["file"],
                r["label"] or "",
                "" if r["confidence"] is None else f"{r['confidence']:.6f}",
                ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r["top_k"]),
                r["error"] or "",
            ]
        )
    atomic_write(path, buf.getvalue())


def fmt(value) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.4f}"
    )
