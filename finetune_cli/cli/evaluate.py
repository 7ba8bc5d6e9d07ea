"""Commands that use a trained model: evaluate, predict, explain."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from finetune_cli.console import Output
from finetune_cli.evaluate.metrics import METRIC_KEYS
from finetune_cli.cli.help import Command
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import QuietOpt
from finetune_cli.cli.common import SetOpt
from finetune_cli.cli.common import TtaOpt
from finetune_cli.cli.common import Tta
from finetune_cli.cli.common import load_config_file
from finetune_cli.cli.common import quiet_tensorflow
from finetune_cli.cli.common import raise_config
from finetune_cli.cli.common import run_command


app = typer.Typer()


Metric = Enum("Metric", {k: k for k in METRIC_KEYS}, type=str)


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
            [f"top_{m.get('top_k')}_accuracy" if k == "top_k_accuracy" else k, fmt(v)]
            for k, v in s.items()
        ],
    )
    if m.get("task") == "multi_label":
        out.table(
            "per label (at its threshold)",
            ["label", "precision", "recall", "f1", "ap", "threshold", "support"],
            [
                [
                    c,
                    fmt(v["precision"]),
                    fmt(v["recall"]),
                    fmt(v["f1"]),
                    fmt(v["ap"]),
                    f"{v['threshold']:.3f}",
                    v["support"],
                ]
                for c, v in m["per_class"].items()
            ],
        )
        out.info(f"thresholds: {m['thresholds_from']}")
    else:
        out.table(
            "per class",
            ["class", "precision", "recall", "f1", "support"],
            [
                [c, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), v["support"]]
                for c, v in m["per_class"].items()
            ],
        )
    if m.get("most_confused"):
        out.table(
            "most confused",
            ["true", "predicted", "count"],
            [[p["true"], p["predicted"], p["count"]] for p in m["most_confused"][:5]],
        )
    c = m.get("calibration")
    if c is not None:
        what = "temperature" if "temperatures" not in c else "mean temperature"
        out.info(
            f"calibration: {what} {c['temperature']:.3f} (fitted on "
            f"{c['fitted_on']}): ECE {fmt(c['ece_before'])} before, "
            f"{fmt(c['ece_after'])} after"
        )
    at = {r["coverage"]: r for r in m.get("selective", {}).get("at_coverage", [])}
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
        str,
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
        Metric,
        typer.Option(
            help="Metric --compare-to compares (accuracy means map for a "
            "multi-label model)."
        ),
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
        k = ev.metrics.get("top_k", top_k)
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
