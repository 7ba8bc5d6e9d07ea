"""The `finetune-cli` command line.

Each command parses its options, loads the config, calls one function and
renders the result. TensorFlow is only imported inside those functions, so
`--help` and config errors come back at once. Exit codes: the table in
`errors.py`, shown by `finetune-cli --help`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from finetune_cli.console import Output
from finetune_cli.errors import EXIT_INTERRUPTED
from finetune_cli.errors import EXIT_UNEXPECTED
from finetune_cli.errors import FinetuneError
from finetune_cli.metrics import METRIC_KEYS


class Algorithm(str, Enum):
    bayesian = "bayesian"
    random = "random"


class ExtractSplit(str, Enum):
    train = "train"
    val = "val"
    test = "test"
    all = "all"


Metric = Enum("Metric", {k: k for k in METRIC_KEYS}, type=str)


class _Help:
    """Help that reads like a man page: `TARGET IMAGES...` in the usage line,
    value placeholders (`PATH`, `INT`, `csv|json`) only for options that
    take a value, none for flags and arguments."""

    def get_params(self, ctx):
        # Every use of the parameters (help, usage, parsing, errors) goes
        # through here, including --help and the completion options.
        params = super().get_params(ctx)
        for param in params:
            _plain_help(param)
        return params


def _plain_help(param) -> None:
    if isinstance(param, typer.core.TyperArgument):
        param.metavar = param.metavar or param.name.upper()
        param.display_type_rich = lambda ctx=None: None
    elif param.is_flag:
        param.display_type_rich = lambda ctx=None: None
    else:
        param.display_type_rich = functools.partial(_placeholder, param)


class Group(_Help, typer.core.TyperGroup):
    pass


class Command(_Help, typer.core.TyperCommand):
    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _placeholder(param, ctx=None) -> str:
    # Typer writes `<path>`, `<int range>`, `<list[str]>`; a metavar wins.
    label = typer.core.TyperOption.display_type_rich(param, ctx)
    label = label.strip("<>").replace(" range", "")
    if label.startswith("list[") or param.multiple:
        label = label.removeprefix("list[").rstrip("]")
    return label if "|" in label or param.metavar else label.upper()


app = typer.Typer(
    no_args_is_help=True,
    cls=Group,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(
    help="Inspect and check experiment configs.", no_args_is_help=True, cls=Group
)
app.add_typer(config_app, name="config")

ConfigArg = Annotated[
    Path, typer.Argument(help="Experiment config (YAML).", show_default=False)
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        "-s",
        metavar="KEY.PATH=VALUE",
        help="Override a config value (repeatable), e.g. "
        "--set phases.1.epochs=3 --set data.batch_size=16.",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
RunOrModelArg = Annotated[
    Path,
    typer.Argument(
        help="A run folder or a .keras file with labels.txt beside it.",
        show_default=False,
    ),
]
ImagesArg = Annotated[
    list[Path],
    typer.Argument(
        help="Image files and/or folders (searched recursively).",
        show_default=False,
    ),
]
PlainOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--plain/--rich",
        help="Force plain (log-friendly) or rich output. "
        "Default: rich at a terminal, plain otherwise.",
        show_default=False,
    ),
]


# Promotion options, shared by `finetune --promote-to` and `promote`.
PromoteGateOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        metavar="METRIC=VALUE",
        help="Promotion gate on the held-out metrics (repeatable).",
    ),
]
CompareToPromotedOpt = Annotated[
    bool,
    typer.Option(
        "--compare-to-promoted/--no-compare-to-promoted",
        help="Refuse promotion when worse than the promoted model on held-out "
        "images neither model trained on.",
    ),
]
PromoteToleranceOpt = Annotated[
    float,
    typer.Option(min=0.0, help="How much worse than the promoted model is tolerated."),
]


def _quiet_tensorflow():
    # TensorFlow's C++ INFO/WARNING lines drown ours in logs; errors stay.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _run(out: Output, debug: bool, fn):
    """Call `fn`, turning our errors into one message and an exit code."""
    try:
        return fn()
    except FinetuneError as e:
        if debug:
            raise
        out.error(e.kind, str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        out.error("interrupted", "stopped by Ctrl-C or SIGTERM")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        out.error(
            "unexpected error",
            f"{type(e).__name__}: {e} "
            "(rerun with --debug for the traceback and please report it)",
        )
        raise typer.Exit(EXIT_UNEXPECTED) from None


def _load(config: Path, overrides):
    from finetune_cli.config import load_config

    return load_config(config, overrides or [])


@app.command(cls=Command)
def finetune(
    config: Annotated[
        Optional[Path],
        typer.Argument(
            help="Experiment config (YAML). Not needed with --resume.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        Optional[Path],
        typer.Option(
            help="Complete an interrupted run in its folder, from its last "
            "saved state (uses the run's own config.yaml and split)."
        ),
    ] = None,
    promote_to: Annotated[
        Optional[Path],
        typer.Option(
            help="After training, make this link point at the new model if it "
            "passes --fail-under and is not worse than the one promoted."
        ),
    ] = None,
    fail_under: PromoteGateOpt = None,
    compare_to_promoted: CompareToPromotedOpt = True,
    tolerance: PromoteToleranceOpt = 0.005,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Run the config's phases and write a run directory.

    Exit codes: 0 done (and promoted), 2 config, 3 data, 4 not promoted
    (gate failed or not better), 5 interrupted (resumable with --resume),
    6 another run holds the experiment.
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        if (config is None) == (resume is None):
            raise_config(
                "give a CONFIG to start a run, or --resume RUN_DIR to "
                "continue one (not both)"
            )
        if resume is not None:
            if set_:
                raise_config("--set cannot change a run being resumed")
            cfg = _load(resume / "config.yaml", [])
        else:
            cfg = _load(config, set_)
        thresholds = None
        if promote_to is not None:
            from finetune_cli import gates
            from finetune_cli import promotion

            thresholds = gates.parse_gates(fail_under, "--fail-under")
            promotion.check_target(promote_to)  # before hours of training
        elif fail_under:
            raise_config(
                "--fail-under on finetune goes with --promote-to; "
                "use `finetune-cli evaluate RUN --fail-under` otherwise"
            )
        _quiet_tensorflow()
        from finetune_cli.trainer import finetune as run

        result = run(cfg, out, argv=sys.argv, resume=resume)
        if promote_to is not None and result.run_dir is not None:
            from finetune_cli import promotion

            promotion.run_promotion(
                result.run_dir,
                promote_to,
                out,
                fail_under=thresholds,
                compare=compare_to_promoted,
                tolerance=tolerance,
            )

    _run(out, debug, job)


def _render_evaluation(out: Output, ev) -> None:
    from finetune_cli.metrics import fmt

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
    out.info(f"report: {ev.out_dir / 'report.html'}")


@app.command("lr-find", cls=Command)
def lr_find(
    config: ConfigArg,
    phase: Annotated[
        int, typer.Option(min=1, help="Which phase (1 = the first), as in the plan.")
    ] = 1,
    steps: Annotated[int, typer.Option(min=10, help="Batches at most.")] = 200,
    min_lr: Annotated[
        float, typer.Option(help="Learning rate of the first batch.")
    ] = 1e-7,
    max_lr: Annotated[
        float, typer.Option(help="Learning rate of the last batch.")
    ] = 10.0,
    out_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Folder for lr_find.csv/.png/.json. Default: "
            "<output_dir>/<experiment.name>/lr-find/<phase name>.",
        ),
    ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """The learning-rate range test for one phase: loss against an
    exponentially growing LR, a plot and a suggested learning rate."""
    out = Output(quiet=quiet, plain=plain)

    def job():
        cfg = _load(config, set_)
        _quiet_tensorflow()
        from finetune_cli import lr_find as lr_find_lib

        r = lr_find_lib.lr_find(cfg, out, phase, steps, min_lr, max_lr, out_dir)
        end = "diverged" if r.diverged else "reached the last step"
        out.info(f"{len(r.lrs)} steps in {r.seconds:.1f}s ({end})")
        if r.suggested is None:
            out.warn(
                "no suggestion: the loss did not fall over the range; try a "
                f"wider range or more steps. Plot: {r.out_dir / 'lr_find.png'}"
            )
            return
        out.success(
            f"suggested learning rate {r.suggested:.2g} (steepest descent; "
            f"lowest loss at {r.min_loss_lr:.2g}); use it with --set "
            f"phases.{phase - 1}.learning_rate={r.suggested:.2g}. Plot: "
            f"{r.out_dir / 'lr_find.png'}"
        )

    _run(out, debug, job)


@app.command(cls=Command)
def tune(
    config: ConfigArg,
    trials: Annotated[
        int, typer.Option(min=1, help="Trials in all (a rerun continues the search).")
    ] = 20,
    algorithm: Annotated[
        Algorithm, typer.Option(help="KerasTuner's search algorithm.")
    ] = Algorithm.bayesian,
    out_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="The tune folder. Default: <output_dir>/<experiment.name>/tune.",
        ),
    ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Search the config's `search:` spaces with KerasTuner.

    Trials that only change the head phases train on cached features
    (seconds each); others are whole runs. Writes trials.csv (ranked) and
    best.yaml (a config finetune accepts); rerun to continue a search.
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        cfg = _load(config, set_)
        _quiet_tensorflow()
        from finetune_cli import tune as tune_lib

        result = tune_lib.tune(cfg, out, trials, algorithm.value, out_dir)
        monitor = cfg.experiment.monitor
        keys = list(cfg.search)
        out.table(
            f"trials ({result.mode}), best first",
            ["rank", "trial", monitor, *keys],
            [
                [
                    str(i),
                    r["trial"],
                    "-" if r["score"] is None else f"{r['score']:.4f}",
                    *[tune_lib.fmt_value(r["values"][k]) for k in keys],
                ]
                for i, r in enumerate(result.rows[:10], 1)
            ],
        )
        if result.best_config is None:
            out.warn("no trial completed; nothing to recommend")
        else:
            out.success(
                f"best {monitor} {result.rows[0]['score']:.4f} (trial "
                f"{result.rows[0]['trial']}) in {result.seconds:.1f}s; config: "
                f"{result.best_config}; all trials: "
                f"{result.tune_dir / 'trials.csv'}"
            )

    _run(out, debug, job)


@app.command(cls=Command)
def extract(
    config: ConfigArg,
    split: Annotated[
        ExtractSplit, typer.Option(help="Which split, or all of them.")
    ] = ExtractSplit.all,
    out_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Folder for the features. Default: "
            "<feature_cache.dir>/<experiment.name>.",
        ),
    ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Run the frozen base over the data; stream features to disk in shards.

    Reuses features whose content key (model, weights, size, data files)
    still matches, and says why when it recomputes.
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        cfg = _load(config, set_)
        _quiet_tensorflow()
        from finetune_cli import features

        results = features.extract_command(cfg, out, split.value, out_dir)
        out.table(
            "features",
            [
                "split",
                "images",
                "feature dim",
                "seconds",
                "images/s",
                "cache",
                "folder",
            ],
            [
                [
                    r.split,
                    r.images,
                    r.feature_dim,
                    f"{r.seconds:.1f}",
                    f"{r.images / r.seconds:.1f}" if r.seconds else "-",
                    "reused" if r.reused else "computed",
                    str(r.folder),
                ]
                for r in results
            ],
        )

    _run(out, debug, job)


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
        typer.Option("--out", help="Output folder. Default: RUN/eval/<name or split>."),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(help="Name of the evaluation folder under RUN/eval/."),
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
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Held-out metrics, per-class report, confusion matrix, plots, gates.

    Exit codes: 0 all gates passed, 4 a gate failed, 2/3 config/data errors.
    """
    out = Output(quiet=quiet or json_out, plain=plain)

    def job():
        from finetune_cli import evaluation
        from finetune_cli import gates

        under = gates.parse_gates(fail_under, "--fail-under")
        over = gates.parse_gates(fail_over, "--fail-over")
        if set_ and config is None:
            raise_config(
                "--set changes the config given with --config; without "
                "--config, evaluate uses the run's recorded split and has no "
                "config to change"
            )
        cfg = _load(config, set_) if config is not None else None
        _quiet_tensorflow()
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

    _run(out, debug, job)


@app.command("export", cls=Command)
def export_(
    target: Annotated[
        Path,
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
        Optional[Path],
        typer.Option("--out", help="Output folder. Default: RUN/export."),
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
    """Write .keras, SavedModel, TFLite and ONNX artifacts and check each
    against the original model (exit 4 when the parity check fails)."""
    out = Output(quiet=quiet, plain=plain)

    def job():
        from finetune_cli import export as export_lib
        from finetune_cli.metrics import fmt

        formats = export_lib.parse_list(format_, export_lib.FORMATS, "--format")
        quants = export_lib.parse_list(quantize, export_lib.QUANTIZATIONS, "--quantize")
        _quiet_tensorflow()
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
            out.table(
                f"parity check: {report['images']} images (Keras model accuracy "
                f"{fmt(report['reference_accuracy'])})",
                [
                    "artifact",
                    "file",
                    "size",
                    "max |diff|",
                    "top-1 agree",
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
        out.info(f"exported to {result.out_dir}")
        export_lib.raise_on_failures(report)

    _run(out, debug, job)


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
        if fmt is None:
            raise_config("--out - (stdout) needs --format csv or --format json")
        return fmt.value
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
            "with - (and --format).",
        ),
    ] = None,
    fmt: Annotated[
        Optional[Format],
        typer.Option("--format", help="csv or json (needed with --out -)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per inference batch.")
    ] = 32,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Batch inference on image files, with labels.

    Images stream through the model in batches (memory stays flat). Without
    --out, one line per image; with --out, only a progress bar and a
    summary (on stderr when --out is -). Unreadable images are reported by
    name; the others are still predicted, and the exit code is then 3.
    """
    to_stdout = out_file == "-"
    out = Output(quiet=quiet, plain=plain, file=sys.stderr if to_stdout else None)

    def job():
        import time

        kind = _prediction_format(out_file, fmt)
        _quiet_tensorflow()
        from finetune_cli import prediction
        from finetune_cli.errors import DataError
        from finetune_cli.metrics import fmt as fmt_number

        files = prediction.collect_images(images)
        rows = prediction.predict(target, files, top_k=top_k, batch_size=batch_size)
        if kind is not None:
            rows = prediction.write_rows(rows, out_file, kind)
        t0 = time.monotonic()
        bad = []
        with out.counter(len(files), "predict", final=False) as progress:
            for n, r in enumerate(rows, 1):
                progress(n)
                if r["error"]:
                    bad.append(r)
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
        out.info(
            f"predicted {len(files) - len(bad)} of {len(files)} images in "
            f"{seconds:.1f}s ({len(files) / max(seconds, 1e-9):.1f} images/s), "
            f"{len(bad)} unreadable{where}"
        )
        if bad:
            raise DataError(
                f"{len(bad)} unreadable image(s): "
                + "; ".join(f"{r['file']}: {r['error']}" for r in bad[:5])
            )

    _run(out, debug, job)


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
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        _quiet_tensorflow()
        from finetune_cli import explain as explain_lib
        from finetune_cli.prediction import collect_images

        files = collect_images(images)
        with out.counter(len(files), "explain") as progress:
            folder, rows = explain_lib.explain(
                target, files, out_dir, batch_size, progress=progress
            )
        out.info(f"explained {len(rows)} images; wrote {folder}")

    _run(out, debug, job)


@app.command(cls=Command)
def promote(
    run_dir: Annotated[
        Path, typer.Argument(help="A completed run folder.", show_default=False)
    ],
    to: Annotated[
        Path,
        typer.Option(
            "--to",
            help="The promotion link (e.g. /srv/models/flowers).",
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
    training (exit 4 when refused)."""
    out = Output(quiet=quiet, plain=plain)

    def job():
        from finetune_cli import gates
        from finetune_cli import promotion
        from finetune_cli.rundir import RunDir

        thresholds = gates.parse_gates(fail_under, "--fail-under")
        state = RunDir(run_dir).live_status().get("state")
        if state != "completed":
            raise_config(
                f"{run_dir}: only a completed run can be promoted "
                f"(its status is {state or 'unknown'})"
            )
        _quiet_tensorflow()
        promotion.run_promotion(
            run_dir,
            to,
            out,
            fail_under=thresholds,
            compare=compare_to_promoted,
            tolerance=tolerance,
        )

    _run(out, debug, job)


def raise_config(message: str):
    from finetune_cli.errors import ConfigError

    raise ConfigError(message)


runs_app = typer.Typer(
    help="Recent runs and their state.", no_args_is_help=True, cls=Group
)
app.add_typer(runs_app, name="runs")


@runs_app.command("list", cls=Command)
def runs_list(
    output_dir: Annotated[
        Path, typer.Option(help="Where runs are written (experiment.output_dir).")
    ] = Path("runs"),
    experiment: Annotated[
        Optional[str], typer.Option(help="Only this experiment.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    debug: DebugOpt = False,
):
    """Recent runs with their status and key metrics."""
    out = Output()

    def job():
        from finetune_cli.rundir import list_runs

        if output_dir.exists() and not output_dir.is_dir():
            raise_config(
                f"--output-dir {output_dir} is a file; expected the "
                "folder runs are written to (experiment.output_dir)"
            )
        rows = list_runs(output_dir, experiment)[:limit]
        if json_out:
            out.text(json.dumps(rows, indent=2))
            return
        out.table(
            f"runs in {output_dir}",
            [
                "experiment",
                "run",
                "state",
                "started",
                "best",
                "test acc",
                "determ.",
                "note",
            ],
            [
                [
                    r["experiment"],
                    r["run"],
                    r["state"],
                    r["started"] or "-",
                    "-" if r["best"] is None else f"{r['monitor']} {r['best']:.4f}",
                    "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}",
                    {True: "yes", False: "no"}.get(r["deterministic"], "-"),
                    _run_note(r),
                ]
                for r in rows
            ],
        )

    _run(out, debug, job)


def _run_note(row: dict) -> str:
    if row["state"] in ("interrupted", "failed") and row.get("resumable"):
        return f"resume: finetune-cli finetune --resume {row['path']}"
    return (row["reason"] or "")[:60]


@config_app.command("show", cls=Command)
def config_show(config: ConfigArg, set_: SetOpt = None, debug: DebugOpt = False):
    """Print the resolved config (defaults and overrides applied) as YAML."""
    out = Output()

    def job():
        from finetune_cli.config import to_yaml

        out.text(to_yaml(_load(config, set_)).rstrip())

    _run(out, debug, job)


@config_app.command("validate", cls=Command)
def config_validate(config: ConfigArg, set_: SetOpt = None, debug: DebugOpt = False):
    """Check a config and the files it names, without TensorFlow.

    Exit 0 when valid; 2 for a config problem, 3 for a data problem, with
    the reason (see README: what config validate checks)."""
    out = Output()

    def job():
        from finetune_cli import checks

        cfg = _load(config, set_)
        checks.check(cfg)
        out.success(
            f"{config}: valid ({len(cfg.phases)} phases, model "
            f"{cfg.model.name}; paths, data layout, weights file and "
            "memory checked)"
        )

    _run(out, debug, job)


@config_app.command("schema", cls=Command)
def config_schema(
    out_file: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Write to this file instead of stdout."),
    ] = None,
):
    """Write the config's JSON Schema (for editor completion)."""
    out = Output()

    def job():
        from finetune_cli.config import json_schema
        from finetune_cli.rundir import atomic_write

        text = json.dumps(json_schema(), indent=2) + "\n"
        if out_file is None:
            out.text(text.rstrip())
            return
        if out_file.is_dir():
            raise_config(f"--out {out_file} is a folder; expected a file path")
        try:
            atomic_write(out_file, text)
        except OSError as e:
            raise_config(f"--out {out_file}: cannot write: {e.strerror}")

    _run(out, False, job)


@app.command(cls=Command)
def init(
    data_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder of class folders (or of train/, val/, test/ folders), "
            "or a path,label CSV file.",
            show_default=False,
        ),
    ],
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="Config file to write.")
    ] = Path("finetune.yaml"),
    model: Annotated[
        str, typer.Option(help="A keras.applications model name.")
    ] = "MobileNetV2",
    weights: Annotated[
        str, typer.Option(help="imagenet, none or a local .h5 weights file.")
    ] = "imagenet",
    name: Annotated[
        Optional[str],
        typer.Option(help="Experiment name (default: the data folder's name)."),
    ] = None,
    image_size: Annotated[
        Optional[int],
        typer.Option(min=8, max=4096, help="Image side (default: the model's)."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace the config file if it exists.")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Write a config with the default recipe for a data folder.

    The recipe is the one measured best (README: "The default recipe,
    measured"): a head phase, then whole blocks at the top of the base with
    BN frozen, on cached augmented views. The folder's classes are listed
    (no image is read) and the config is checked before it is written.

    Exit codes: 0 written, 2 bad option or the file exists (without
    --force), 3 the data is missing or has fewer than 2 classes.
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        _quiet_tensorflow()
        from finetune_cli import recipe

        made = recipe.generate(
            data_dir, model=model, weights=weights, name=name, image_size=image_size
        )
        recipe.write(out_file, made.text, force=force)
        out.success(
            f"wrote {out_file}: {made.images} images in "
            f"{len(made.class_names)} classes; fine-tune {made.why}. "
            f"Next: finetune-cli finetune {out_file}"
        )

    _run(out, debug, job)


@app.command(cls=Command)
def synth(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder to create.", show_default=False)
    ],
    task: Annotated[
        str, typer.Option(help="Which class set: 'source' or 'target'.")
    ] = "source",
    per_class: Annotated[
        int, typer.Option(min=2, max=100_000, help="Images per class.")
    ] = 100,
    size: Annotated[
        int, typer.Option(min=8, max=4096, help="Image side in pixels.")
    ] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    force: Annotated[
        bool, typer.Option(help="Replace the folder if it exists.")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Generate a labelled synthetic image dataset (folder per class).

    Used by `make demo` so the tool runs offline; see data/README.md.
    """
    out = Output(quiet=quiet)

    def job():
        from finetune_cli import synthetic

        counts = synthetic.generate(
            out_dir, task, per_class=per_class, size=size, seed=seed, force=force
        )
        out.success(
            f"wrote {sum(counts.values())} images in {len(counts)} "
            f"classes to {out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        )

    _run(out, debug, job)


def _version(value: bool):
    if value:
        from finetune_cli import __version__

        typer.echo(f"finetune-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version.", is_eager=True, callback=_version
        ),
    ] = False,
):
    """Fine-tune keras.applications image classifiers from YAML configs.

    Exit codes: 0 ok, 1 unexpected error, 2 usage or config error, 3 data
    error, 4 quality gate failed, 5 interrupted (resumable), 6 another run
    holds the experiment.
    """


def main():
    """Console-script entry point (Click's usage errors also exit 2)."""
    if "--debug" not in sys.argv:
        from finetune_cli.console import filter_native_stderr

        filter_native_stderr()
    app()
