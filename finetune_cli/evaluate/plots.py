"""PNG plots for reports (matplotlib, headless Agg backend)."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np

from finetune_cli.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(cm: np.ndarray, classes, path) -> Path:
    """Counts and row-normalised confusion matrices side by side."""
    plt = _pyplot()
    n = len(classes)
    side = max(4.0, 0.5 * n + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), dpi=100)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    for ax, values, title, fmt in (
        (axes[0], cm, "counts", "d"),
        (axes[1], norm, "row-normalised", ".2f"),
    ):
        im = ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        if n <= 30:
            top = values.max() or 1
            for i in range(n):
                for j in range(n):
                    v = values[i, j]
                    ax.text(
                        j,
                        i,
                        format(v, fmt),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if v > top / 2 else "black",
                    )
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path, plt)


def read_history(history_csv) -> tuple[list[dict], list[int]]:
    """The rows of a run's history.csv and their epochs.

    Raises:
        DamagedFile: the file is not text, or a row lacks a number.
    """
    from finetune_cli.files import damaged
    from finetune_cli.files import read_text

    todo = "it is rewritten from the run's state by `finetune --resume`"
    rows = list(csv.DictReader(io.StringIO(read_text(history_csv, todo=todo))))
    try:
        epochs = [int(r["epoch"]) for r in rows]
        for r in rows:
            for k, v in r.items():
                if k is None or v is None:
                    raise ValueError("a row with too many or too few fields")
                if k != "phase" and v != "":
                    float(v)
    except (KeyError, TypeError, ValueError):
        raise damaged(history_csv, "a row is truncated or not numbers", todo) from None
    return rows, epochs


def curves_png(history_csv, path) -> Path:
    """Loss and accuracy per epoch, train and val, phase boundaries marked."""
    plt = _pyplot()
    from matplotlib import ticker

    rows, epochs = read_history(history_csv)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            col = prefix + key
            if rows and col in rows[0]:
                ax.plot(
                    epochs,
                    [float(r[col]) for r in rows],
                    style,
                    marker="o",
                    markersize=3,
                    label=col,
                )
        for i in range(1, len(rows)):
            if rows[i]["phase"] != rows[i - 1]["phase"]:
                ax.axvline(epochs[i] - 0.5, color="gray", linestyle=":")
                ax.text(
                    epochs[i] - 0.4,
                    ax.get_ylim()[1],
                    rows[i]["phase"],
                    va="top",
                    fontsize=8,
                    color="gray",
                )
        if rows:
            ax.text(
                epochs[0],
                ax.get_ylim()[1],
                rows[0]["phase"],
                va="top",
                fontsize=8,
                color="gray",
            )
        # Epochs are whole numbers: no 1.5 ticks on short runs.
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path, plt)


def reliability_png(before, after, path) -> Path:
    """The reliability diagram: accuracy against confidence per bin, before
    and after calibration (`calibration.reliability` rows), the diagonal
    being perfect calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect")
    for rows, style, label in ((before, "o--", "before"), (after, "s-", "after")):
        ax.plot(
            [r["confidence"] for r in rows],
            [r["accuracy"] for r in rows],
            style,
            markersize=4,
            label=f"{label} calibration",
        )
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return _save(fig, path, plt)


def coverage_png(labels, probs, path) -> Path:
    """Accuracy on the answered images against coverage, answering the
    most confident first (selective prediction)."""
    plt = _pyplot()
    conf = np.asarray(probs).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    order = np.argsort(-conf, kind="stable")
    n = np.arange(1, len(order) + 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(n / max(len(order), 1), np.cumsum(correct[order]) / n, "-")
    ax.set_xlabel("coverage (share answered, most confident first)")
    ax.set_ylabel("accuracy on the answered")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    return _save(fig, path, plt)


def lr_find_png(lrs, smoothed, suggested, path) -> Path:
    """Smoothed loss against learning rate (log scale), the suggestion marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(lrs, smoothed, color="tab:blue", label="loss (smoothed)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    if smoothed:
        # The divergence at the end would squash the useful part.
        top = min(
            max(smoothed), 2.0 * smoothed[0] if smoothed[0] > 0 else max(smoothed)
        )
        ax.set_ylim(min(smoothed) * 0.95, top * 1.05)
    if suggested is not None:
        ax.axvline(
            suggested, color="tab:red", ls="--", label=f"suggested {suggested:.2g}"
        )
    ax.legend()
    ax.set_title("learning-rate range test")
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path, plt) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def img_tag(path: Path, alt: str) -> str:
    """An <img> of a PNG file, embedded (base64)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def thumbnail_tag(path: str, size: int = 96) -> str:
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


def curves_html(curves) -> str:
    """The training curves of a report: the plot (a path), why there is
    none (a string), or none at all (not a run)."""
    if isinstance(curves, str):
        return f"<p>No training curves: {html.escape(curves)}</p>"
    if curves is None:
        return "<p>No training history (not a run folder).</p>"
    return img_tag(curves, "training curves")


def page_head(title: str) -> str:
    """The start of a self-contained report page, up to <body>."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 4px; text-align: center; font-size: 11px; }}
img {{ max-width: 100%; }}
</style></head><body>
"""
