"""What every command shares: the shared options and the error runner that
turns our errors into one message and an exit code (`errors.py`). Help
formatting is `help.py`. No TensorFlow at import."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from finetune_cli.console import Output
from finetune_cli.errors import EXIT_INTERRUPTED
from finetune_cli.errors import EXIT_UNEXPECTED
from finetune_cli.errors import FinetuneError
from finetune_cli.signals import sigterm_as_interrupt


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


VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="At a terminal, also show internal names (cut tensors, cache "
        "folders and keys); plain output and log.txt always have them.",
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]


RunOrModelArg = Annotated[
    str,
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


Tta = Enum("Tta", {"none": "none", "flip": "flip"}, type=str)
TtaOpt = Annotated[
    Tta,
    typer.Option(
        help="Test-time augmentation: flip averages each image and its "
        "mirror (two passes)."
    ),
]


PromoteToleranceOpt = Annotated[
    float,
    typer.Option(min=0.0, help="How much worse than the promoted model is tolerated."),
]


def quiet_tensorflow():
    # TensorFlow's C++ INFO/WARNING lines drown ours in logs; errors stay.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _flush_mirrors(out: Output) -> None:
    """Upload the local mirrors of remote folders a command used (a remote
    feature cache), however the command ended."""
    import sys

    remote = sys.modules.get("finetune_cli.remote")  # not imported: none used
    if remote is not None:
        try:
            remote.flush()
        except Exception as e:  # noqa: BLE001 - a cache: never fail the command
            out.warn(f"could not upload a remote feature cache: {e}")


def run_command(out: Output, debug: bool, fn):
    """Call `fn`, turning our errors into one message and an exit code.

    SIGTERM (a scheduler's or cron's timeout) stops every command as Ctrl-C
    does: exit 5, with whatever the command had half-written removed by its
    own cleanup (outputs are written to temporary names and renamed last).
    """
    try:
        with sigterm_as_interrupt():
            try:
                return fn()
            finally:
                _flush_mirrors(out)
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
        from finetune_cli.files import storage_error

        storage = storage_error(e, "make room (or a writable folder) and run it again")
        if storage is not None:
            out.error(storage.kind, str(storage))
            raise typer.Exit(storage.exit_code) from None
        out.error(
            "unexpected error",
            f"{type(e).__name__}: {e} "
            "(rerun with --debug for the traceback and please report it)",
        )
        raise typer.Exit(EXIT_UNEXPECTED) from None


def load_config_file(config: Path, overrides):
    from finetune_cli.config import load_config

    return load_config(config, overrides or [])


def raise_config(message: str):
    from finetune_cli.errors import ConfigError

    raise ConfigError(message)
