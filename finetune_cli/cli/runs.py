"""The `runs` group: recent runs and their state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from finetune_cli.console import Output
from finetune_cli.console import short_metric
from finetune_cli.cli.help import Command
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.help import Group
from finetune_cli.cli.common import raise_config
from finetune_cli.cli.common import run_command


app = typer.Typer()


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
    """Recent runs with their status and key metrics.

    Example: finetune-cli runs list --experiment flowers --limit 5
    """
    out = Output()

    def job():
        from finetune_cli.run.folder import list_runs

        if output_dir.exists() and not output_dir.is_dir():
            raise_config(
                f"--output-dir {output_dir} is a file; expected the "
                "folder runs are written to (experiment.output_dir)"
            )
        rows = list_runs(output_dir, experiment)[:limit]
        if json_out:
            out.text(json.dumps(rows, indent=2))
            return
        # Five columns: the run's id is its start time; started,
        # determinism and reasons in full are in --json.
        out.table(
            f"runs in {output_dir}",
            ["run", "state", "best", "test acc", "note"],
            [
                [
                    f"{r['experiment']}/{r['run']}",
                    r["state"],
                    "-"
                    if r["best"] is None
                    else f"{short_metric(r['monitor'])} {r['best']:.4f}",
                    "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}",
                    _run_note(r),
                ]
                for r in rows
            ],
            right=("test acc",),
        )
        for r in rows:
            if r["state"] in ("interrupted", "failed") and r.get("resumable"):
                out.info(f"resume: finetune-cli finetune --resume {r['path']}")

    run_command(out, debug, job)


def _run_note(row: dict) -> str:
    if row["state"] in ("interrupted", "failed") and row.get("resumable"):
        return "resumable (below)"
    return (row["reason"] or "")[:40]
