"""The `models` group: the applications finetune-cli can fine-tune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune_cli.cli.common import ConfigArg
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import QuietOpt
from finetune_cli.cli.common import SetOpt
from finetune_cli.cli.common import load_config_file
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


@app.command(cls=Command)
def select(
    config: ConfigArg,
    models: Annotated[
        list[str],
        typer.Option(
            "--models",
            "-m",
            help="Candidate applications (repeatable, or space-separated in "
            "one quoted value).",
            show_default=False,
        ),
    ],
    weights: Annotated[
        Optional[list[str]],
        typer.Option(
            "--weights",
            "-w",
            metavar="[MODEL=]WEIGHTS",
            help="A candidate's weights: MODEL=FILE (or =imagenet, =none); a "
            "bare value is for every candidate without its own. Default: the "
            "config's for its model, a no-top file in the Keras cache, else "
            "imagenet (a download).",
        ),
    ] = None,
    image_size: Annotated[
        Optional[int],
        typer.Option(
            min=8,
            max=4096,
            help="Image side for every candidate (default: "
            "the config's, or a model's default where it needs one).",
        ),
    ] = None,
    out_file: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="The winner's config (default: CONFIG's name + .select.yaml, "
            "beside it).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the ranking as JSON.")
    ] = False,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Rank backbones on a config's data by a probe on cached features.

    Each base's train and validation features are cached once and a
    logistic-regression probe is trained on them; the table shows its
    validation accuracy beside the base's speed, parameters and exported
    size, and the winner's config is written. The test split is not read.

    Exit codes: 0 ranked (a candidate that could not be built is listed as
    left out), 2 bad option or config, 3 data error.

    Example: finetune-cli select flowers.yaml -m MobileNetV2 -m ResNet50
    """
    out = Output(quiet=quiet or json_out, plain=plain)

    def job():
        cfg = load_config_file(config, set_)
        from finetune_cli.config import recipe

        target = out_file or config.with_name(f"{config.stem}.select.yaml")
        recipe.check_out(target, force)
        names = [n for value in models for n in value.replace(",", " ").split()]
        named, default = _parse_weights(weights or [])
        quiet_tensorflow()
        from finetune_cli.config.loader import parse_yaml
        from finetune_cli.search import backbones

        candidates = backbones.candidate_configs(cfg, names, named, default, image_size)
        ranked = backbones.select(cfg, candidates, out)
        winner = ranked[0]
        raw = parse_yaml(config.read_text(encoding="utf-8"), str(config)) or {}
        from finetune_cli.config.loader import apply_overrides

        text, _ = backbones.winner_config(
            apply_overrides(raw, set_ or []), winner, str(config)
        )
        recipe.write(target, text, force=force)
        if json_out:
            typer.echo(
                json.dumps(
                    {"ranking": [c.as_dict() for c in ranked], "config": str(target)},
                    indent=2,
                )
            )
            return
        # A multi-label probe is scored by mAP (`heads.train_probe`).
        score = "val mAP" if cfg.task == "multi_label" else "val acc"
        out.table(
            f"backbones (probe on frozen features; {score}, base speed here)",
            ["#", "model", "px", score, "img/s", "params", "export"],
            [_row(i, c) for i, c in enumerate(ranked, 1)],
            right=("#", "px", score, "img/s", "params", "export"),
        )
        out.success(
            f"wrote {target}: {winner.name}. Next: finetune-cli finetune {target}"
        )

    run_command(out, debug, job)


def _row(i, c) -> list:
    if c.error:
        return [i, c.name, c.image_size, "left out", "-", "-", "-"]
    return [
        i,
        c.name,
        c.image_size,
        f"{c.val_accuracy:.4f}",
        f"{c.images_per_s:.1f}",
        f"{c.params / 1e6:.1f}M",
        f"{c.export_bytes / 1e6:.1f} MB",
    ]


def _parse_weights(values) -> tuple[dict, Optional[str]]:
    """--weights values -> ({model: weights}, the weights for the rest)."""
    named, default = {}, None
    for v in values:
        model, sep, w = v.partition("=")
        if not sep:
            if default is not None:
                raise_config(
                    "--weights: one bare value (for every candidate) at most; "
                    f"name the model for the others (MODEL=FILE). Received: {v}"
                )
            default = v
        elif not model or not w:
            raise_config(f"--weights: expected MODEL=WEIGHTS. Received: {v}")
        else:
            named[model.strip()] = w.strip()
    return named, default
