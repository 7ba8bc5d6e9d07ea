"""The `finetune-cli` command line: the root app, joining one Typer app per
command group (Typer's "one file per command").

Each command parses its options, loads the config, calls one function and
renders the result. TensorFlow is only imported inside those functions, so
`--help` and config errors come back at once. Exit codes: the table in
`errors.py`, shown by `finetune-cli --help`.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import typer.core

from finetune_cli.cli import data
from finetune_cli.cli import deploy
from finetune_cli.cli import evaluate
from finetune_cli.cli import models
from finetune_cli.cli import predict
from finetune_cli.cli import prepare
from finetune_cli.cli import runs
from finetune_cli.cli import train
from finetune_cli.cli.help import Group


app = typer.Typer(
    no_args_is_help=True,
    cls=Group,
    pretty_exceptions_enable=False,
)
# In a newcomer's order: prepare, train, use, ship, then the groups.
app.add_typer(prepare.app)
app.add_typer(data.app)
app.add_typer(train.app)
app.add_typer(evaluate.app)
app.add_typer(predict.app)
app.add_typer(deploy.app)
app.add_typer(runs.app)
app.add_typer(models.app)


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
    holds the experiment, 7 stopped by the time limit (resumable), 8 a
    file finetune-cli wrote is damaged, 9 disk full or read-only.

    Example: finetune-cli init ~/photos --out my.yaml, then finetune my.yaml
    """


def main():
    """Console-script entry point (Click's usage errors also exit 2)."""
    # A file name that is not UTF-8 is shown escaped, never a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if "--debug" not in sys.argv:
        from finetune_cli.console import filter_native_stderr

        filter_native_stderr()
    app()
