"""The files of an evaluation folder: metrics, per-class scores, predictions,
plots and one self-contained `report.html`.

| file | content |
| --- | --- |
| `metrics.json` | see `metrics.compute_metrics` (plus model, data, split) |
| `per_class.csv` | class, precision, recall, f1, support |
| `predictions.csv` | file, true, predicted, confidence, top_k (label:prob;...) |
| `confusion_matrix.png` | counts and row-normalised, side by side |
| `curves.png` | loss and accuracy per epoch with phase boundaries (runs) |
| `gradcam/` | Grad-CAM overlays: the worst mistakes, a few correct per class |
| `report.html` | all of the above and the worst misclassified images |
"""

from __future__ import annotations

import base64
import dataclasses
import csv
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Optional

import numpy as np

from finetune_cli import faults
from finetune_cli.errors import DamagedFile
from finetune_cli.evaluate import plots
from finetune_cli.files import atomic_write
from finetune_cli.run.folder import staged_folder
from finetune_cli.files import write_json

if TYPE_CHECKING:
    from finetune_cli.model.saved import Target


@dataclasses.dataclass
class Evaluation:
    """One scored split: the metrics, the folder they were written to, and
    the raw probabilities and labels behind them."""

    metrics: dict
    out_dir: Path
    probs: np.ndarray
    labels: np.ndarray
    files: list[str]
    overlays: list = dataclasses.field(default_factory=list)
    run_dir: Optional[Path] = None  # the run evaluated, if a run folder


def write_report(ev: Evaluation, target: Target) -> None:
    """Write the report folder `ev.out_dir` whole or not at all: it is
    filled under a hidden temporary name and renamed into place (over the
    one it replaces), so an evaluation stopped by a signal, a crash or a
    full disk never leaves a half report that reads as done."""
    with staged_folder(ev.out_dir, "make room and evaluate again") as tmp:
        _write_into(tmp, ev, target)


def _write_into(out: Path, ev: Evaluation, target: Target) -> None:
    m = ev.metrics
    if m.get("task") == "multi_label":
        from finetune_cli.evaluate import labelsets_report

        labelsets_report.write_into(
            out, ev, target, lambda folder: _curves(target, folder)
        )
        return
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

    faults.point("report")

    plots.confusion_matrix_png(
        np.array(m["confusion_matrix"]), classes, out / "confusion_matrix.png"
    )
    curves = _curves(target, out)
    if len(ev.labels):
        plots.coverage_png(ev.labels, ev.probs, out / "coverage.png")
    if "calibration" in m:
        c = m["calibration"]
        plots.reliability_png(
            c["reliability_before"], c["reliability_after"], out / "reliability.png"
        )
    for i, ov in enumerate(ev.overlays):
        atomic_write(out / "gradcam" / overlay_name(i, ov), ov.png)
    atomic_write(out / "report.html", render_html(ev, curves, out))


def _curves(target, out: Path):
    """The run's training curves in `out` (a path), why there are none (a
    string), or None (not a run)."""
    history = target.run_dir / "history.csv" if target.run_dir else None
    if history is None or not history.is_file():
        return None
    try:
        return plots.curves_png(history, out / "curves.png")
    except DamagedFile as e:  # a view of the run; the metrics stand
        return str(e)


def overlay_name(i: int, ov) -> str:
    return f"{i:03d}-{ov.kind}-{Path(ov.file).stem}.png"


def _gradcam_html(ev: Evaluation) -> str:
    if not ev.overlays:
        return "<p>No Grad-CAM overlays (no images, or not a finetune-cli model).</p>"
    classes = ev.metrics["classes"]
    e = html.escape
    parts = []
    for kind, title in (("mistake", "Worst mistakes"), ("correct", "Correct")):
        figs = "".join(
            f'<figure><img width="160" alt="{e(Path(o.file).name)}" '
            f'src="data:image/png;base64,{base64.b64encode(o.png).decode()}">'
            f"<figcaption>{e(Path(o.file).name)}<br>true <b>{e(classes[o.true])}"
            f"</b><br>pred <b>{e(classes[o.predicted])}</b> ({o.confidence:.2f})"
            "</figcaption></figure>"
            for o in ev.overlays
            if o.kind == kind
        )
        if figs:
            parts.append(f"<h3>{title}</h3><div>{figs}</div>")
    return "".join(parts)


def _confidence_html(m: dict, folder: Path) -> str:
    """Calibration, selective prediction and unknown images, as found."""
    parts = []

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    c = m.get("calibration")
    if c is not None:
        parts.append(
            f"""<h2 id="calibration">Calibration</h2>
<p>Temperature {c["temperature"]:.3f}, fitted on {html.escape(c["fitted_on"])},
folded into the model's output layer.</p>
<table><tr><th></th><th>before</th><th>after</th></tr>
<tr><td>ECE</td><td>{num(c["ece_before"])}</td><td>{num(c["ece_after"])}</td></tr>
<tr><td>log loss</td><td>{num(c["log_loss_before"])}</td>
<td>{num(c["log_loss_after"])}</td></tr></table>
{plots.img_tag(folder / "reliability.png", "reliability diagram")}"""
        )
    sel = m.get("selective")
    if sel is not None:
        rows = "".join(
            f"<tr><td>{r['coverage']:.0%}</td><td>{r['threshold']:.4f}</td>"
            f"<td>{r['accuracy']:.4f}</td></tr>"
            for r in sel["at_coverage"]
        )
        parts.append(
            f"""<h2 id="selective">Selective prediction</h2>
<p>Answering only the most confident images: accuracy on those answered.</p>
<table><tr><th>coverage</th><th>threshold</th><th>accuracy</th></tr>{rows}</table>
{plots.img_tag(folder / "coverage.png", "accuracy against coverage")}"""
        )
    u = m.get("unknown")
    if u is not None:
        rows = "".join(
            f"<tr><td>{r['threshold']:.2f}</td><td>{num(r['rejected'])}</td>"
            f"<td>{num(r['kept_in_class'])}</td></tr>"
            for r in u["by_threshold"]
        )
        parts.append(
            f"""<h2 id="unknown">Images of none of the classes</h2>
<p>{u["images"]} images from <code>{html.escape(u["folder"])}</code>. At
threshold {u["threshold"]:.4f} ({u["coverage"]:.0%} of the in-class images
answered) {num(u["rejected"])} of them are rejected as unknown.</p>
<table><tr><th>threshold</th><th>unknown rejected</th><th>in-class kept</th></tr>
{rows}</table>"""
        )
    return "\n".join(parts)


def worst_mistakes(ev: Evaluation, limit: int = 24):
    """Misclassified images, most confident mistakes first."""
    pred = ev.probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != ev.labels)
    order = wrong[np.argsort(-ev.probs[wrong, pred[wrong]], kind="stable")]
    return [
        (ev.files[i], int(ev.labels[i]), int(pred[i]), float(ev.probs[i, pred[i]]))
        for i in order[:limit]
    ]


def render_html(ev: Evaluation, curves: "Optional[Path] | str", folder=None) -> str:
    """The report page; `curves` is the plot, or why there is none;
    `folder` holds its images (default `ev.out_dir`)."""
    folder = Path(folder or ev.out_dir)
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
            f"<figure>{plots.thumbnail_tag(f)}<figcaption>{e(Path(f).name)}<br>true "
            f"<b>{e(classes[t])}</b><br>pred <b>{e(classes[p])}</b> ({c:.2f})"
            f"</figcaption></figure>"
            for f, t, p, c in worst_mistakes(ev)
        )
        or "<p>No misclassified images.</p>"
    )
    curves_html = plots.curves_html(curves)
    return (
        plots.page_head("finetune-cli evaluation")
        + f"""<h1>Evaluation</h1>
<p>Model: <code>{e(m["model"])}</code><br>Data: <code>{e(str(m["data"]))}</code>
 (split {e(m["split"])}), {m["num_samples"]} images, {len(classes)} classes.</p>
<h2 id="summary">Summary</h2>
<table><tr><th>metric</th><th>value</th></tr>{rows}</table>
<h2 id="per-class">Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr>
{per_class}</table>
<h2 id="confusion">Confusion matrix</h2>
{plots.img_tag(folder / "confusion_matrix.png", "confusion matrix")}
<h2 id="most-confused">Most confused pairs</h2>
<table><tr><th>true</th><th>predicted</th><th>count</th><th>fraction of true</th></tr>
{confused}</table>
{_confidence_html(m, folder)}
<h2 id="curves">Training curves</h2>
{curves_html}
<h2 id="mistakes">Worst misclassified images</h2>
<div>{mistakes}</div>
<h2 id="gradcam">Grad-CAM: where the model looked</h2>
<p>Heat of the predicted class at the base's last feature map (red: most).</p>
{_gradcam_html(ev)}
</body></html>
"""
    )
