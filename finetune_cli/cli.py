"""The `finetune-cli` command line.

Each command parses its options, loads the config, calls one function and
renders the result. TensorFlow is only imported inside those functions, so
`--help` and config errors come back at once. Exit codes: see `errors.py`
(0 ok, 1 unexpected, 2 config/usage, 3 data, 4 gate, 5 interrupted).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune_cli.console import Output
from finetune_cli.errors import EXIT_INTERRUPTED
from finetune_cli.errors import EXIT_UNEXPECTED
from finetune_cli.errors import FinetuneError

app = typer.Typer(
    help="Fine-tune keras.applications image classifiers from YAML configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and check experiment configs.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML).",
                                           show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY.PATH=VALUE",
                 help="Override a config value (repeatable), e.g. "
                      "--set phases.1.epochs=3 --set data.batch_size=16."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q",
                                        help="Only warnings and errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug",
                                        help="Show tracebacks for errors.")]
PlainOpt = Annotated[Optional[bool], typer.Option(
    "--plain/--rich", help="Force plain (log-friendly) or rich output. "
                           "Default: rich at a terminal, plain otherwise.",
    show_default=False)]


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
        out.error("interrupted", "stopped by the user")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        out.error("unexpected error", f"{type(e).__name__}: {e} "
                  "(rerun with --debug for the traceback and please report it)")
        raise typer.Exit(EXIT_UNEXPECTED) from None


def _load(config: Path, overrides):
    from finetune_cli.config import load_config

    return load_config(config, overrides or [])


@app.command()
def finetune(
    config: ConfigArg,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Run the config's phases and write a run directory."""
    out = Output(quiet=quiet, plain=plain)

    def job():
        cfg = _load(config, set_)
        _quiet_tensorflow()
        from finetune_cli.training import finetune as run

        return run(cfg, out, argv=sys.argv)

    _run(out, debug, job)


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None, debug: DebugOpt = False):
    """Print the resolved config (defaults and overrides applied) as YAML."""
    out = Output()

    def job():
        from finetune_cli.config import to_yaml

        out.text(to_yaml(_load(config, set_)).rstrip())

    _run(out, debug, job)


@config_app.command("validate")
def config_validate(config: ConfigArg, set_: SetOpt = None,
                    debug: DebugOpt = False):
    """Check a config; exit 0 when valid, 2 with the reason when not."""
    out = Output()

    def job():
        cfg = _load(config, set_)
        out.success(f"{config}: valid ({len(cfg.phases)} phases, model "
                    f"{cfg.model.name})")

    _run(out, debug, job)


@config_app.command("schema")
def config_schema(
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write to this file instead of stdout.")] = None,
):
    """Write the config's JSON Schema (for editor completion)."""
    from finetune_cli.config import json_schema
    from finetune_cli.rundir import atomic_write

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out_file is None:
        Output().text(text.rstrip())
    else:
        atomic_write(out_file, text)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create.",
                                            show_default=False)],
    task: Annotated[str, typer.Option(
        help="Which class set: 'source' or 'target'.")] = "source",
    per_class: Annotated[int, typer.Option(help="Images per class.")] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option(
        help="Replace the folder if it exists.")] = False,
    quiet: QuietOpt = False,
):
    """Generate a labelled synthetic image dataset (folder per class).

    Used by `make demo` so the tool runs offline; see data/README.md.
    """
    out = Output(quiet=quiet)

    def job():
        from finetune_cli import synthetic

        counts = synthetic.generate(out_dir, task, per_class=per_class,
                                    size=size, seed=seed, force=force)
        out.success(f"wrote {sum(counts.values())} images in {len(counts)} "
                    f"classes to {out_dir}: " + ", ".join(
                        f"{k} {v}" for k, v in counts.items()))

    _run(out, False, job)


def _version(value: bool):
    if value:
        from finetune_cli import __version__

        typer.echo(f"finetune-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", help="Print the version.", is_eager=True,
        callback=_version)] = False,
):
    """Fine-tune keras.applications image classifiers from YAML configs.

    Exit codes: 0 ok, 1 unexpected error, 2 usage or config error, 3 data
    error, 4 quality gate failed, 5 interrupted.
    """


def main():
    """Console-script entry point (Click's usage errors also exit 2)."""
    app()
