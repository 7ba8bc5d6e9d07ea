"""Commands that ship a model: export (with the parity check) and promote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from finetune_cli.console import Output
from finetune_cli.cli.help import Command
from finetune_cli.cli.common import CompareToPromotedOpt
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import PromoteGateOpt
from finetune_cli.cli.common import PromoteToleranceOpt
from finetune_cli.cli.common import QuietOpt
from finetune_cli.cli.common import quiet_tensorflow
from finetune_cli.cli.common import raise_config
from finetune_cli.cli.common import run_command


app = typer.Typer()


@app.command("export", cls=Command)
def export_(
    target: Annotated[
        str,
        typer.Argument(
            help="A run folder (uses best.keras) or a .keras file with labels.txt "
            "beside it.",
            show_default=False,
        ),
    ],
    format_: Annotated[
        str,
        typer.Option(
            "--format", help="Comma-separated: keras, saved_model, tflite, onnx."
        ),
    ] = "keras,saved_model,tflite",
    quantize: Annotated[
        str,
        typer.Option(
            help="TFLite variants, comma-separated: none, float16, dynamic, int8."
        ),
    ] = "none",
    out_dir: Annotated[
        Optional[str],
        typer.Option("--out", help="Output folder (or gs://...). Default: RUN/export."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace an existing export folder.")
    ] = False,
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="Images for the parity check and int8 calibration (default: "
            "the run's validation and training splits)."
        ),
    ] = None,
    parity_images: Annotated[
        int,
        typer.Option(
            min=1,
            help="Validation images in the parity check (all of them when "
            "there are fewer).",
        ),
    ] = 250,
    calibration_images: Annotated[
        int, typer.Option(min=1, help="Training images that calibrate int8.")
    ] = 128,
    opset: Annotated[int, typer.Option(min=9, help="ONNX opset.")] = 17,
    tolerance: Annotated[
        float,
        typer.Option(help="Max probability difference allowed for float artifacts."),
    ] = 1e-4,
    max_accuracy_drop: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Gate for quantized artifacts: how far their accuracy on the "
            "parity images may fall below the Keras model's.",
        ),
    ] = 0.02,
    min_agreement: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            max=1.0,
            help="Also gate quantized artifacts on top-1 agreement with the "
            "Keras model (off by default; 0.97 when the images have no labels).",
            show_default=False,
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Run the parity check.")
    ] = True,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Write .keras, SavedModel, TFLite and ONNX artifacts, each checked.

    Each artifact is checked against the original model (the parity
    check); exit 4 when one fails, the files then kept for inspection and
    marked failed in export_report.json.

    Example: finetune-cli export runs/flowers/latest --quantize int8
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        from finetune_cli.deploy import export as export_lib
        from finetune_cli.deploy import formats as formats_lib
        from finetune_cli.deploy import parity as parity_lib
        from finetune_cli.evaluate.metrics import fmt

        formats = export_lib.parse_list(format_, formats_lib.FORMATS, "--format")
        quants = export_lib.parse_list(
            quantize, formats_lib.QUANTIZATIONS, "--quantize"
        )
        quiet_tensorflow()
        result = export_lib.export(
            target,
            formats=formats,
            quantize=quants,
            out=out_dir,
            force=force,
            data=data,
            parity_images=parity_images,
            calibration_images=calibration_images,
            opset=opset,
            tolerance=tolerance,
            max_accuracy_drop=max_accuracy_drop,
            min_agreement=min_agreement,
            check=check,
            progress=out.info,
            warn=out.warn,
        )
        report = result.report
        if report is not None:
            sets = report.get("compared_on") == "label sets"
            out.table(
                f"parity check: {report['images']} images (Keras model "
                f"{'subset accuracy' if sets else 'accuracy'} "
                f"{fmt(report['reference_accuracy'])}"
                f"{'; agreement on label sets' if sets else ''})",
                [
                    "artifact",
                    "file",
                    "size",
                    "max |diff|",
                    "set agree" if sets else "top-1 agree",
                    "accuracy",
                    "acc. drop",
                    "ms/image",
                    "ok",
                ],
                [
                    [
                        r["artifact"],
                        Path(r["path"]).name,
                        f"{r['size_bytes'] / 1e6:.2f} MB",
                        f"{r['max_abs_diff']:.2e}",
                        f"{r['top1_agreement']:.4f}",
                        fmt(r["accuracy"]),
                        fmt(r.get("accuracy_drop")),
                        f"{r['latency_ms']:.2f}",
                        "yes" if r["passed"] else "NO",
                    ]
                    for r in report["artifacts"]
                ],
            )
            for note in report["notes"]:
                out.warn(note)
        parity_lib.raise_on_failures(report, result.out_dir)
        out.success(f"exported to {result.remote_dir or result.out_dir}")

    run_command(out, debug, job)


@app.command(cls=Command)
def benchmark(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run folder with an export.", show_default=False),
    ],
    export_dir: Annotated[
        Optional[Path],
        typer.Option("--export", help="The export folder. Default: RUN/export."),
    ] = None,
    batch: Annotated[
        int, typer.Option(min=1, help="Images a call, for the throughput.")
    ] = 32,
    latency_images: Annotated[
        int, typer.Option(min=1, help="Images timed one at a time (p50, p95).")
    ] = 50,
    min_accuracy: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            max=1.0,
            help="Gate: fail (exit 4) naming each format whose accuracy on the "
            "run's test split is below this.",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print only benchmark.json to stdout.")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Each exported format on the run's test split: accuracy, latency
    p50/p95 at batch 1, throughput, size; writes benchmark.json.

    Exit codes: 0 done (and every format passed --min-accuracy), 2 no run
    or no export, 3 no test split, 4 a format below --min-accuracy.

    Example: finetune-cli benchmark runs/flowers/latest --min-accuracy 0.9
    """
    out = Output(quiet=quiet or json_out, plain=plain)

    def job():
        import json

        quiet_tensorflow()
        from finetune_cli.deploy import benchmark as benchmark_lib
        from finetune_cli.errors import GateError

        try:
            result = benchmark_lib.benchmark(
                run_dir,
                export_dir=export_dir,
                batch=batch,
                latency_images=latency_images,
                min_accuracy=min_accuracy,
                progress=out.info,
            )
            report, failed = result.report, None
        except GateError as e:
            folder = export_dir or run_dir / "export"
            report = json.loads((folder / benchmark_lib.FILE).read_text())
            failed = e
        if json_out:
            out.text(json.dumps(report, indent=2))
        else:
            _render_benchmark(out, report)
        if failed is not None:
            raise failed

    run_command(out, debug, job)


def _render_benchmark(out, report: dict) -> None:
    rows = report["artifacts"]
    out.table(
        f"benchmark: {report['images']} test images, batch {report['batch']}",
        ["format", "size", "accuracy", "p50 ms", "p95 ms", "images/s", "ok"],
        [
            [
                r["artifact"],
                f"{r['size_bytes'] / 1e6:.1f} MB",
                f"{r['accuracy']:.4f}",
                f"{r['latency_ms_p50']:.1f}",
                f"{r['latency_ms_p95']:.1f}",
                "-" if r["throughput"] is None else f"{r['throughput']:.0f}",
                "yes"
                if not any(
                    f.startswith(r["artifact"] + ":") for f in report["failures"]
                )
                else "NO",
            ]
            for r in rows
        ],
        right=("size", "accuracy", "p50 ms", "p95 ms", "images/s"),
    )
    out.info(f"wrote {Path(report['export']) / 'benchmark.json'}")


@app.command(cls=Command)
def promote(
    run_dir: Annotated[
        str, typer.Argument(help="A completed run folder.", show_default=False)
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The promotion link (e.g. /srv/models/flowers, or gs://...).",
            show_default=False,
        ),
    ],
    fail_under: PromoteGateOpt = None,
    compare_to_promoted: CompareToPromotedOpt = True,
    tolerance: PromoteToleranceOpt = 0.005,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Promote a finished run, as `finetune --promote-to` does after
    training (exit 4 when refused).

    Example: finetune-cli promote runs/flowers/latest --to /srv/models/flowers
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        from finetune_cli.evaluate import gates
        from finetune_cli.deploy import promotion
        from finetune_cli.run.folder import RunDir

        from finetune_cli import remote

        thresholds = gates.parse_gates(fail_under, "--fail-under")
        run_remote = None
        if remote.is_remote(run_dir):  # a run folder on object storage
            quiet_tensorflow()
            path, run_remote = remote.local_run(run_dir)
        else:
            path = Path(run_dir)
        run = RunDir(path)
        if not path.is_dir():
            raise_config(f"{run_dir}: not a run folder (no such folder)")
        state = run.live_status(run.read_status()).get("state")
        if state != "completed":
            raise_config(
                f"{run_dir}: only a completed run can be promoted "
                f"(its status is {state or 'unknown'})"
            )
        quiet_tensorflow()
        promotion.run_promotion(
            path,
            to,
            out,
            fail_under=thresholds,
            compare=compare_to_promoted,
            tolerance=tolerance,
            run_remote=run_remote,
        )

    run_command(out, debug, job)
