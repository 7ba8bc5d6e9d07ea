"""Commands that use a trained model: evaluate, predict, explain."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from finetune_cli.console import Output
from finetune_cli.evaluate.metrics import METRIC_KEYS
from finetune_cli.cli.help import Command
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.common import ImagesArg
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import QuietOpt
from finetune_cli.cli.common import RunOrModelArg
from finetune_cli.cli.common import SetOpt
from finetune_cli.cli.common import load_config_file
from finetune_cli.cli.common import quiet_tensorflow
from finetune_cli.cli.common import raise_config
from finetune_cli.cli.common import run_command


app = typer.Typer()


Metric = Enum("Metric", {k: k for k in METRIC_KEYS}, type=str)
Tta = Enum("Tta", {"none": "none", "flip": "flip"}, type=str)
TtaOpt = Annotated[
    Tta,
    typer.Option(
        help="Test-time augmentation: flip averages each image and its "
        "mirror (two passes)."
    ),
]


def _render_evaluation(out: Output, ev) -> None:
    from finetune_cli.evaluate.metrics import fmt

    m = ev.metrics
    out.step(
        f"evaluate {m['model']} on {m['data']} ({m['split']}, "
        f"{m['num_samples']} images)"
    )
    s = m["summary"]
    out.table(
        "metrics",
        ["metric", "value"],
        [
            [("top_%d_accuracy" % m["top_k"]) if k == "top_k_accuracy" else k, fmt(v)]
            for k, v in s.items()
        ],
    )
    out.table(
        "per class",
        ["class", "precision", "recall", "f1", "support"],
        [
            [c, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), v["support"]]
            for c, v in m["per_class"].items()
        ],
    )
    if m["most_confused"]:
        out.table(
            "most confused",
            ["true", "predicted", "count"],
            [[p["true"], p["predicted"], p["count"]] for p in m["most_confused"][:5]],
        )
    c = m.get("calibration")
    if c is not None:
        out.info(
            f"calibration: temperature {c['temperature']:.3f} (fitted on "
            f"{c['fitted_on']}): ECE {fmt(c['ece_before'])} before, "
            f"{fmt(c['ece_after'])} after"
        )
    at = {r["coverage"]: r for r in m["selective"]["at_coverage"]}
    if 0.9 in at:
        r = at[0.9]
        out.info(
            f"selective: answering the 90% most confident, accuracy "
            f"{fmt(r['accuracy'])} (threshold {r['threshold']:.3f})"
        )
    u = m.get("unknown")
    if u is not None:
        out.info(
            f"unknown: at threshold {u['threshold']:.3f} ({u['coverage']:.0%} of "
            f"the {m['split']} images answered), {fmt(u['rejected'])} of the "
            f"{u['images']} images in {u['folder']} rejected"
        )
    out.info(f"report: {ev.out_dir / 'report.html'}")


@app.command(cls=Command)
def evaluate(
    target: Annotated[
        Path,
        typer.Argument(
            help="A run folder (uses best.keras) or a .keras file with labels.txt "
            "beside it.",
            show_default=False,
        ),
    ],
    config: Annotated[
        Optional[Path],
        typer.Option(
            help="Take the data (and split) from this config instead of the run's."
        ),
    ] = None,
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="Evaluate on this folder of class folders (all images) or CSV."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Which split of the data.")] = "test",
    out_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Output folder. Default: RUN/eval/<name>, or RUN/eval/<split> "
            "(<split>-2, -3, ... when taken).",
        ),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(
            help="Name of the evaluation folder under RUN/eval/ (replaced if it "
            "exists). Default: the split, or split-2, -3, ... when taken."
        ),
    ] = None,
    top_k: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="k of top-k accuracy, below the number of classes (at k >= "
            "classes every label is in the top k). Default: 5, lowered to "
            "classes - 1 when there are fewer.",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print only the metrics JSON to stdout.")
    ] = False,
    fail_under: Annotated[
        Optional[list[str]],
        typer.Option(
            metavar="METRIC=VALUE",
            help="Gate: fail (exit 4) when METRIC is below VALUE. Repeatable.",
        ),
    ] = None,
    fail_over: Annotated[
        Optional[list[str]],
        typer.Option(
            metavar="METRIC=VALUE",
            help="Gate: fail (exit 4) when METRIC (log_loss, ece) is above VALUE.",
        ),
    ] = None,
    compare_to: Annotated[
        Optional[Path],
        typer.Option(
            help="Gate: fail (exit 4) when worse than this run or model on the "
            "same images."
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="How much worse --compare-to allows.")
    ] = 0.005,
    compare_metric: Annotated[
        Metric, typer.Option(help="Metric --compare-to compares.")
    ] = Metric.accuracy,
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            help="Leave out files of the run's recorded split that are gone or "
            "changed (named in a warning) instead of stopping.",
        ),
    ] = False,
    tta: TtaOpt = Tta.none,
    unknown: Annotated[
        Optional[Path],
        typer.Option(
            metavar="DIR",
            help="A folder of images of none of the classes: the share each "
            "confidence threshold rejects as unknown.",
        ),
    ] = None,
    coverage: Annotated[
        float,
        typer.Option(
            min=0.01,
            max=1.0,
            help="With --unknown: the share of in-class images the reported "
            "threshold keeps answered.",
        ),
    ] = 0.95,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Held-out metrics, per-class report, confusion matrix, plots, gates.

    Exit codes: 0 all gates passed, 4 a gate failed, 2/3 config/data errors.

    Example: finetune-cli evaluate runs/flowers/latest --fail-under accuracy=0.9
    """
    out = Output(quiet=quiet or json_out, plain=plain)

    def job():
        from finetune_cli.evaluate import evaluation
        from finetune_cli.evaluate import gates

        under = gates.parse_gates(fail_under, "--fail-under")
        over = gates.parse_gates(fail_over, "--fail-over")
        if set_ and config is None:
            raise_config(
                "--set changes the config given with --config; without "
                "--config, evaluate uses the run's recorded split and has no "
                "config to change"
            )
        cfg = load_config_file(config, set_) if config is not None else None
        quiet_tensorflow()
        ev = evaluation.evaluate(
            target,
            config=cfg,
            data=data,
            split=split,
            out=out_dir,
            name=name,
            top_k=5 if top_k is None else top_k,
            allow_missing=allow_missing,
            warn=out.warn,
            tta=tta.value,
            unknown=unknown,
            coverage=coverage,
        )
        k = ev.metrics["top_k"]
        if top_k is not None and k != top_k:
            out.warn(
                f"--top-k {top_k}: the model has {len(ev.metrics['classes'])} "
                f"classes, so top-k accuracy is computed with k={k} (with k >= "
                "the number of classes it would be 1.0 for any model)"
            )
        if json_out:
            out.text(json.dumps(ev.metrics, indent=2))
        else:
            _render_evaluation(out, ev)
        gates.gate(
            ev,
            fail_under=under,
            fail_over=over,
            compare_to=compare_to,
            tolerance=tolerance,
            compare_metric=compare_metric.value,
        )
        if under or over or compare_to is not None:
            out.success("all gates passed")

    run_command(out, debug, job)


class Format(str, Enum):
    csv = "csv"
    json = "json"


def _prediction_format(out_file: Optional[str], fmt: Optional[Format]):
    """The format of `predict --out`, checked before TensorFlow loads."""
    if out_file is None:
        if fmt is not None:
            raise_config("--format needs --out FILE, or --out - for stdout")
        return None
    if out_file == "-":
        return "csv" if fmt is None else fmt.value
    path = Path(out_file)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("csv", "json"):
        raise_config(
            "--out must end in .csv or .json, or be - (stdout) with --format. "
            f"Received: {out_file}"
        )
    if fmt is not None and fmt.value != suffix:
        raise_config(
            f"--format {fmt.value} does not match the suffix of --out. "
            f"Received: {out_file}"
        )
    if path.is_dir():
        raise_config(f"--out {out_file} is a folder; expected a file name")
    return suffix


@app.command(cls=Command)
def predict(
    target: RunOrModelArg,
    images: ImagesArg,
    top_k: Annotated[int, typer.Option(min=1, help="How many labels per image.")] = 3,
    out_file: Annotated[
        Optional[str],
        typer.Option(
            "--out",
            metavar="FILE",
            help="Write predictions to a .csv or .json file, or to stdout "
            "with - (CSV unless --format json).",
        ),
    ] = None,
    fmt: Annotated[
        Optional[Format],
        typer.Option("--format", help="csv or json, for --out - (default csv)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per inference batch.")
    ] = 32,
    tta: TtaOpt = Tta.none,
    reject_below: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            max=1.0,
            metavar="P",
            help="Answer 'unknown' when the top (calibrated) probability is "
            "below P; 0: never. Default: the run's calibration.reject_below.",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Batch inference on image files, with labels.

    Images stream through the model in batches (memory stays flat). Without
    --out, one line per image; with --out, only a progress bar and a
    summary (on stderr when --out is -). Unreadable images are reported by
    name; the others are still predicted, and the exit code is then 3.
    Files in a folder that are not images (by extension) are left out and
    counted in a warning; a file named on the command line is always tried.

    Example: finetune-cli predict runs/flowers/latest photos/ --out preds.csv
    """
    to_stdout = out_file == "-"
    out = Output(quiet=quiet, plain=plain, file=sys.stderr if to_stdout else None)

    def job():
        import time

        kind = _prediction_format(out_file, fmt)
        quiet_tensorflow()
        from finetune_cli.evaluate import prediction
        from finetune_cli.errors import DataError
        from finetune_cli.evaluate.metrics import fmt as fmt_number

        not_images: list[str] = []
        files = prediction.collect_images(images, not_images)
        if not_images:
            shown = ", ".join(not_images[:3]) + (", ..." if len(not_images) > 3 else "")
            out.warn(
                f"left out {len(not_images)} file(s) that are not images (by "
                f"extension: {', '.join(prediction.IMAGE_EXTENSIONS)}): {shown}"
            )
        # The model loads here: what follows times the inference alone.
        rows = prediction.predict(
            target,
            files,
            top_k=top_k,
            batch_size=batch_size,
            tta=tta.value,
            reject_below=reject_below,
        )
        if kind is not None:
            rows = prediction.write_rows(rows, out_file, kind)
        t0 = time.monotonic()
        first = min(batch_size, len(files))  # the first batch: warm-up
        warm = None
        bad = []
        unknown = 0
        with out.counter(len(files), "predict", final=False) as progress:
            for n, r in enumerate(rows, 1):
                progress(n)
                if n == first:
                    warm = time.monotonic()
                if r["error"]:
                    bad.append(r)
                unknown += r["rejected"]
                if kind is None:
                    top = ", ".join(
                        f"{t['label']} {t['probability']:.3f}" for t in r["top_k"]
                    )
                    out.info(
                        f"{r['file']}: "
                        + (
                            f"{r['label']} {fmt_number(r['confidence'])} ({top})"
                            if not r["error"]
                            else f"unreadable: {r['error']}"
                        )
                    )
        seconds = time.monotonic() - t0
        where = (
            ""
            if kind is None
            else (" to stdout" if to_stdout else f"; wrote {out_file}")
        )
        rate = "too few images for a rate"
        if len(files) > first and warm is not None:
            per_s = (len(files) - first) / max(time.monotonic() - warm, 1e-9)
            rate = f"{per_s:.1f} images/s after the first batch"
        out.info(
            f"predicted {len(files) - len(bad)} of {len(files)} images in "
            f"{seconds:.1f}s ({rate}), {len(bad)} unreadable"
            + (f", {unknown} unknown" if unknown else "")
            + where
        )
        if bad:
            raise DataError(
                f"{len(bad)} unreadable image(s): "
                + "; ".join(f"{r['file']}: {r['error']}" for r in bad[:5])
            )

    run_command(out, debug, job)


@app.command(cls=Command)
def explain(
    target: RunOrModelArg,
    images: ImagesArg,
    out_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            metavar="PATH",
            help="A new folder for the overlays [default: RUN/explain/N].",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 16,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Grad-CAM heat maps: where the model looked for its prediction.

    Writes one overlay PNG per image (the heat map of the predicted class
    at the base's last feature map) and explanations.csv (file, predicted,
    confidence, overlay) into a new folder; an existing --out is refused.

    Example: finetune-cli explain runs/flowers/latest photos/rose1.jpg
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        quiet_tensorflow()
        from finetune_cli.evaluate import explain as explain_lib
        from finetune_cli.evaluate.prediction import collect_images

        files = collect_images(images)
        with out.counter(len(files), "explain") as progress:
            folder, rows = explain_lib.explain(
                target, files, out_dir, batch_size, progress=progress
            )
        out.info(f"explained {len(rows)} images; wrote {folder}")

    run_command(out, debug, job)
