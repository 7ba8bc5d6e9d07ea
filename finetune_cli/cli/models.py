"""The `models` group: the applications finetune-cli can fine-tune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import quiet_tensorflow
from finetune_cli.cli.common import raise_config
from finetune_cli.cli.common import run_command
from finetune_cli.cli.help import Command
from finetune_cli.cli.help import Group
from finetune_cli.console import Output


app = typer.Typer()
models_app = typer.Typer(
    help="The keras.applications models finetune-cli can fine-tune.",
    no_args_is_help=True,
    cls=Group,
)
app.add_typer(models_app, name="models")


@models_app.command("list", cls=Command)
def models_list(
    names: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Only these applications (default: all).", show_default=False
        ),
    ] = None,
    measure: Annotated[
        bool,
        typer.Option(
            "--measure",
            help="Build each (weights=None) to count its parameters and time "
            "one image at batch 1 here; kept for later listings.",
        ),
    ] = False,
    weights_dir: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--weights-dir",
            metavar="DIR",
            help="Also look for no-top weights files here (repeatable).",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    plain: PlainOpt = None,
    debug: DebugOpt = False,
):
    """Every application with its input sizes, parameters and speed
    measured here (--measure), and whether its ImageNet weights are a
    local file or a download.

    Example: finetune-cli models list MobileNetV2 ResNet50 --measure
    """
    out = Output(plain=plain, quiet=json_out)

    def job():
        from finetune_cli.model import applications
        from finetune_cli.model import catalog

        wanted = []
        for n in names or []:
            try:
                wanted.append(applications.get(n).name)
            except KeyError as e:
                raise_config(f"models list: {e.args[0]}")
        measured = None
        if measure:
            quiet_tensorflow()
            measured = dict(catalog.recorded())
            todo = wanted or list(applications.APPLICATIONS)
            for i, name in enumerate(todo, 1):
                out.info(f"measuring {name} ({i}/{len(todo)})")
                measured[name] = catalog.measure(name)
        rows = catalog.rows(weights_dir or (), measured)
        if wanted:
            rows = [r for r in rows if r["name"] in wanted]
        if json_out:
            typer.echo(json.dumps(rows, indent=2))
            return
        out.table(
            "models (input: default/min px; ms: one image, batch 1, here)",
            ["model", "input", "params", "ms", "weights"],
            [
                [
                    r["name"],
                    f"{r['default_size']}/{r['min_size']}",
                    "-" if r["params"] is None else f"{r['params'] / 1e6:.1f}M",
                    "-" if r["latency_ms"] is None else f"{r['latency_ms']:.0f}",
                    r["weights"],
                ]
                for r in rows
            ],
            right=("input", "params", "ms"),
        )
        if not measure and all(r["params"] is None for r in rows):
            out.info("params, ms: measured here with --measure (and kept)")
        out.info("weights: local = a no-top file here (Keras cache, --weights-dir)")
        out.info("         download = fetched by Keras on first use")

    run_command(out, debug, job)
