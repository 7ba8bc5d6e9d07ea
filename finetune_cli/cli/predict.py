"""Commands that use a trained model: predict (labels for images) and
explain (where the model looked)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune_cli.console import Output
from finetune_cli.cli.help import Command
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.common import ImagesArg
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import QuietOpt
from finetune_cli.cli.common import RunOrModelArg
from finetune_cli.cli.common import Tta
from finetune_cli.cli.common import TtaOpt
from finetune_cli.cli.common import quiet_tensorflow
from finetune_cli.cli.common import raise_config
from finetune_cli.cli.common import run_command


app = typer.Typer()


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


def _answer(row: dict) -> str:
    """A row's label; a multi-label row's set, `(none)` when empty."""
    if "labels" in row:
        return row["label"] or "(none)"
    return row["label"]


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
                            f"{_answer(r)} {fmt_number(r['confidence'])} ({top})"
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
