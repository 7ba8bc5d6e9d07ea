"""The evaluation folder of a multi-label model (`labelsets.py`).

| file | content |
| --- | --- |
| `metrics.json` | see `labelsets.compute` (plus model, data, split) |
| `per_class.csv` | label, precision, recall, f1, ap, threshold, support |
| `predictions.csv` | file, true, predicted (labels joined by `|`), scores |
| `reliability.png` | per-label probabilities against the share positive |
| `curves.png` | loss and metrics per epoch (runs) |
| `report.html` | all of the above and the images with the most wrong labels |
"""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

import numpy as np

from finetune_cli import faults
from finetune_cli.evaluate import labelsets
from finetune_cli.evaluate import plots
from finetune_cli.files import atomic_write
from finetune_cli.files import write_json


def write_into(out: Path, ev, target, curves_of) -> None:
    """Fill `out` (a staged folder) with the report of `ev`."""
    m = ev.metrics
    classes = m["classes"]
    write_json(out / "metrics.json", m)
    rows = [["label", "precision", "recall", "f1", "ap", "threshold", "support"]]
    for name, s in m["per_class"].items():
        ap = "" if s["ap"] is None else f"{s['ap']:.6f}"
        rows.append(
            [
                name,
                *(f"{s[k]:.6f}" for k in ("precision", "recall", "f1")),
                ap,
                f"{s['threshold']:.6f}",
                s["support"],
            ]
        )
    atomic_write(out / "per_class.csv", _csv(rows))
    th = np.array([m["thresholds"][c] for c in classes])
    pred = labelsets.label_sets(ev.probs, th)
    rows = [["file", "true", "predicted", "scores"]]
    for f, y, p, s in zip(ev.files, ev.labels, pred, ev.probs, strict=True):
        rows.append(
            [
                f,
                join(classes, y > 0.5),
                join(classes, p),
                ";".join(f"{c}:{v:.6f}" for c, v in zip(classes, s, strict=True)),
            ]
        )
    atomic_write(out / "predictions.csv", _csv(rows))
    faults.point("report")
    curves = curves_of(out)
    if "calibration" in m:
        c = m["calibration"]
        plots.reliability_png(
            c["reliability_before"], c["reliability_after"], out / "reliability.png"
        )
    atomic_write(out / "report.html", render_html(ev, pred, curves, out))


def join(classes, mask) -> str:
    """The labels of a row of booleans, joined by `|`."""
    return "|".join(c for c, on in zip(classes, mask, strict=True) if on)


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def worst(ev, pred, limit: int = 24):
    """Images with the most wrong label decisions, most first."""
    y = np.asarray(ev.labels) > 0.5
    wrong = (pred != y).sum(axis=1)
    order = np.argsort(-wrong, kind="stable")
    return [i for i in order[:limit] if wrong[i] > 0]


def render_html(ev, pred, curves, folder: Path) -> str:
    m, e = ev.metrics, html.escape
    classes = m["classes"]

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    rows = "".join(
        f"<tr><td>{e(k)}</td><td>{v:.4f}</td></tr>" for k, v in m["summary"].items()
    )
    per = "".join(
        f"<tr><td>{e(c)}</td><td>{num(v['precision'])}</td><td>{num(v['recall'])}"
        f"</td><td>{num(v['f1'])}</td><td>{num(v['ap'])}</td>"
        f"<td>{v['threshold']:.3f}</td><td>{v['support']}</td></tr>"
        for c, v in m["per_class"].items()
    )
    y = np.asarray(ev.labels) > 0.5
    mistakes = (
        "".join(
            f"<figure>{plots.thumbnail_tag(ev.files[i])}<figcaption>"
            f"{e(Path(ev.files[i]).name)}<br>true <b>{e(join(classes, y[i]) or '-')}"
            f"</b><br>pred <b>{e(join(classes, pred[i]) or '-')}</b></figcaption>"
            "</figure>"
            for i in worst(ev, pred)
        )
        or "<p>Every label of every image right.</p>"
    )
    c = m.get("calibration")
    cal = ""
    if c is not None:
        cal = f"""<h2 id="calibration">Calibration</h2>
<p>A temperature per label (geometric mean {c["temperature"]:.3f}), fitted on
{e(c["fitted_on"])}, folded into the output layer.</p>
<table><tr><th></th><th>before</th><th>after</th></tr>
<tr><td>ECE</td><td>{num(c["ece_before"])}</td><td>{num(c["ece_after"])}</td></tr>
<tr><td>log loss</td><td>{num(c["log_loss_before"])}</td>
<td>{num(c["log_loss_after"])}</td></tr></table>
{plots.img_tag(folder / "reliability.png", "reliability diagram")}"""
    curves_html = plots.curves_html(curves)
    return (
        plots.page_head("finetune-cli evaluation (multi-label)")
        + f"""<h1>Evaluation (multi-label)</h1>
<p>Model: <code>{e(m["model"])}</code><br>Data: <code>{e(str(m["data"]))}</code>
 (split {e(m["split"])}), {m["num_samples"]} images, {len(classes)} labels.
Thresholds: {e(m["thresholds_from"])}.</p>
<h2 id="summary">Summary</h2>
<table><tr><th>metric</th><th>value</th></tr>{rows}</table>
<h2 id="per-label">Per label</h2>
<table><tr><th>label</th><th>precision</th><th>recall</th><th>f1</th><th>AP</th>
<th>threshold</th><th>support</th></tr>{per}</table>
{cal}
<h2 id="curves">Training curves</h2>
{curves_html}
<h2 id="mistakes">Images with the most wrong labels</h2>
<div>{mistakes}</div>
</body></html>
"""
    )
