"""Commands before a run: init (a config for your data), audit (your
images' likely problems) and the `config` group (show, validate, schema).
Commands that make data are in `data.py`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from finetune_cli.console import Output
from finetune_cli.cli.help import Command
from finetune_cli.cli.common import ConfigArg
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.help import Group
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import QuietOpt
from finetune_cli.cli.common import SetOpt
from finetune_cli.cli.common import load_config_file
from finetune_cli.cli.common import quiet_tensorflow
from finetune_cli.cli.common import raise_config
from finetune_cli.cli.common import run_command


app = typer.Typer()


config_app = typer.Typer(
    help="Inspect and check experiment configs.", no_args_is_help=True, cls=Group
)


app.add_typer(config_app, name="config")


@config_app.command("show", cls=Command)
def config_show(config: ConfigArg, set_: SetOpt = None, debug: DebugOpt = False):
    """Print the resolved config (defaults and overrides applied) as YAML.

    Example: finetune-cli config show flowers.yaml --set data.batch_size=16
    """
    out = Output()

    def job():
        from finetune_cli.config import to_yaml

        out.text(to_yaml(load_config_file(config, set_)).rstrip())

    run_command(out, debug, job)


@config_app.command("validate", cls=Command)
def config_validate(config: ConfigArg, set_: SetOpt = None, debug: DebugOpt = False):
    """Check a config and the files it names, without TensorFlow.

    Exit 0 when valid; 2 for a config problem, 3 for a data problem, with
    the reason (docs/commands.md: what config validate checks).

    Example: finetune-cli config validate flowers.yaml
    """
    out = Output()

    def job():
        from finetune_cli.config import checks

        cfg = load_config_file(config, set_)
        checks.check(cfg)
        out.success(
            f"{config}: valid ({len(cfg.phases)} phases, model "
            f"{cfg.model.name}; paths, data layout, weights file and "
            "memory checked)"
        )

    run_command(out, debug, job)


@config_app.command("schema", cls=Command)
def config_schema(
    out_file: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Write to this file instead of stdout."),
    ] = None,
):
    """Write the config's JSON Schema (for editor completion).

    Example: finetune-cli config schema --out finetune.schema.json
    """
    out = Output()

    def job():
        from finetune_cli.config import json_schema
        from finetune_cli.files import atomic_write

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

    run_command(out, False, job)


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

    The recipe is the one measured best (docs/recipes.md: "The default
    recipe"): a head phase, then whole blocks at the top of the base with BN
    frozen, on cached augmented views. The folder's classes are listed (no
    image is read) and the config is checked before it is written.

    Exit codes: 0 written, 2 bad option or the file exists (without
    --force), 3 the data is missing or has fewer than 2 classes.

    Example: finetune-cli init ~/photos/flowers --out flowers.yaml
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        quiet_tensorflow()
        from finetune_cli.config import recipe

        made = recipe.generate(
            data_dir, model=model, weights=weights, name=name, image_size=image_size
        )
        recipe.write(out_file, made.text, force=force)
        out.success(
            f"wrote {out_file}: {made.images} images in "
            f"{len(made.class_names)} classes; fine-tune {made.why}. "
            f"Next: finetune-cli finetune {out_file}"
        )

    run_command(out, debug, job)


@app.command(cls=Command)
def audit(
    target: Annotated[
        Path,
        typer.Argument(
            help="A folder of class folders, or a run folder (its recorded "
            "split, its config's base).",
            show_default=False,
        ),
    ],
    model: Annotated[
        Optional[str],
        typer.Option(help="The base for a folder (default MobileNetV2)."),
    ] = None,
    weights: Annotated[
        Optional[str],
        typer.Option(help="imagenet, none or a .h5 file (default imagenet)."),
    ] = None,
    image_size: Annotated[
        Optional[int],
        typer.Option(min=8, max=4096, help="Image side (default: the model's)."),
    ] = None,
    out_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Report folder (default: RUN/audit, or audit-<folder> here).",
        ),
    ] = None,
    folds: Annotated[
        int, typer.Option(min=2, max=20, help="Folds of the cross-validated probe.")
    ] = 5,
    duplicate_threshold: Annotated[
        float,
        typer.Option(
            min=0.5,
            max=1.0,
            help="Cosine similarity from which two images are duplicates.",
        ),
    ] = 0.98,
    fail_over: Annotated[
        Optional[list[str]],
        typer.Option(
            "--fail-over",
            metavar="KIND=N",
            help="Exit 4 when more than N findings of KIND (label_error, "
            "duplicate, cross_class_duplicate, cross_split_duplicate, outlier, "
            "unreadable).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace the report folder.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the counts and findings as JSON.")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Likely label errors, near-duplicates and outliers in your images.

    From the frozen base's cached features (nothing but a probe trains):
    cross-validated probabilities rank images whose label the others
    contradict; similar features find near-duplicates (within a class,
    across classes, across a run's splits); images far from every class
    are outliers. Writes audit.csv, audit.json and audit.html with
    thumbnails. Exit 0 whatever it finds, unless a --fail-over gate fails
    (4); 2/3 for config/data errors.

    Example: finetune-cli audit ~/photos/flowers --weights mobilenet_v2.h5
    """
    out = Output(quiet=quiet or json_out, plain=plain)

    def job():
        is_run = (target / "split.json").is_file()
        if is_run and (model or weights or image_size):
            raise_config(
                "--model, --weights and --image-size are for a folder; a run is "
                f"audited with its own config's base. Received: {target}"
            )
        default_out = target / "audit" if is_run else Path(f"audit-{target.name}")
        report = out_dir or default_out
        if report.exists() and not force:
            raise_config(f"--out: {report} exists; pass --force to replace it")
        quiet_tensorflow()
        from finetune_cli.search import audit as audit_lib

        gates = audit_lib.parse_gates(fail_over)
        if is_run:
            from finetune_cli.config import load_run_config
            from finetune_cli.data import split as split_lib

            cfg = load_run_config(target)
            index = split_lib.load(target)
        else:
            if not target.is_dir():
                from finetune_cli.errors import DataError

                raise DataError(f"DATA: folder not found: {target}")
            name = "audit-" + "".join(
                c if c.isalnum() or c in "._-" else "-" for c in target.resolve().name
            )
            cfg = audit_lib.data_config(
                target, model or "MobileNetV2", weights or "imagenet", image_size, name
            )
            index = None
        result = audit_lib.audit(
            cfg,
            out,
            index=index,
            out_dir=report,
            folds=folds,
            duplicate_threshold=duplicate_threshold,
        )
        counts = result.counts()
        if json_out:
            typer.echo(
                json.dumps(
                    {
                        "images": result.images,
                        "counts": counts,
                        "report": str(report),
                        "findings": [vars(f) for f in result.findings],
                    },
                    indent=2,
                )
            )
        else:
            out.table(
                f"audit of {result.images} images ({result.seconds:.0f}s)",
                ["finding", "count"],
                [[kind.replace("_", " "), counts[kind]] for kind in audit_lib.KINDS],
                right=("count",),
            )
            for kind in audit_lib.KINDS:
                shown = [f for f in result.findings if f.kind == kind][:5]
                for f in shown:
                    out.info(f"{kind.replace('_', ' ')}: {audit_lib.describe(f)}")
            out.info(f"report: {report / 'audit.html'} (all of them: audit.csv)")
        audit_lib.check_gates(result, gates)
        if gates:
            out.success("all audit gates passed")

    run_command(out, debug, job)
