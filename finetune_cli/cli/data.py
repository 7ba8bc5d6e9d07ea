"""Commands that make data: synth (offline synthetic images) and pack
(images into TFRecord shards for data.records)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finetune_cli.console import Output
from finetune_cli.cli.help import Command
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import QuietOpt
from finetune_cli.cli.common import quiet_tensorflow
from finetune_cli.cli.common import run_command


app = typer.Typer()


@app.command(cls=Command)
def synth(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder to create.", show_default=False)
    ],
    task: Annotated[
        str,
        typer.Option(
            help="Which class set: 'source' or 'target'; 'multi_label' for "
            "images of several shapes and a labels.csv."
        ),
    ] = "source",
    per_class: Annotated[
        int,
        typer.Option(
            min=2, max=100_000, help="Images per class (multi_label: images)."
        ),
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

    Example: finetune-cli synth data/shapes --per-class 50 --size 64
    """
    out = Output(quiet=quiet)

    def job():
        from finetune_cli.data import synthetic

        counts = synthetic.generate(
            out_dir, task, per_class=per_class, size=size, seed=seed, force=force
        )
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        if task == "multi_label":
            out.success(f"wrote {per_class} images and labels.csv to {out_dir}")
            out.info(f"images per label: {shown}")
            return
        out.success(
            f"wrote {sum(counts.values())} images in {len(counts)} "
            f"classes to {out_dir}: {shown}"
        )

    run_command(out, debug, job)


@app.command(cls=Command)
def pack(
    data: Annotated[
        Path,
        typer.Argument(
            help="A folder of class folders (or train/, val/, test/ of them) "
            "or a path,label CSV.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        str,
        typer.Option(
            "--out",
            metavar="SHARDS",
            help="The folder to write (local, or gs://... through tf.io.gfile).",
            show_default=False,
        ),
    ],
    val: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Share for val (data.split).")
    ] = 0.1,
    test: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Share for test (data.split).")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="The split's seed.")] = 42,
    multi_label: Annotated[
        bool,
        typer.Option(
            "--multi-label", help="Label cells are label sets (task: multi_label)."
        ),
    ] = False,
    label_separator: Annotated[
        str, typer.Option(help="Joins the labels of a multi-label cell.")
    ] = "|",
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard.")] = 1024,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad", help="Leave out bad images (listed) instead of stopping."
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace SHARDS if it exists.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Pack images into TFRecord shards and a manifest (data.records).

    The split is made here (stratified by --val, --test and --seed, or a
    CSV's split column, or train/ val/ test/ folders) and every image is
    checked first. Train with `data: {records: SHARDS}`.

    Example: finetune-cli pack data/flower_photos --out data/flowers-shards
    """
    out = Output(quiet=quiet, plain=plain)

    def job():
        from finetune_cli import config as config_lib
        from finetune_cli.errors import ConfigError

        is_csv = data.suffix.lower() == ".csv"
        try:
            section = config_lib.Data(
                **({"csv": str(data)} if is_csv else {"dir": str(data)}),
                split={"train": round(1 - val - test, 6), "val": val, "test": test},
                label_separator=label_separator,
                on_bad_image="skip" if skip_bad else "error",
            )
        except Exception as e:  # noqa: BLE001 - pydantic's, said plainly
            raise ConfigError(f"pack: {str(e).splitlines()[-1]}") from None
        quiet_tensorflow()
        from finetune_cli.data.pack import pack_data

        manifest = pack_data(
            section,
            out_dir,
            seed=seed,
            multi_label=multi_label,
            shard_size=shard_size,
            out=out,
            force=force,
        )
        counts = ", ".join(f"{s} {v['images']}" for s, v in manifest["splits"].items())
        skipped = manifest["skipped"]
        if skipped:
            out.warn(f"left out {len(skipped)} bad image(s), e.g. {skipped[0][0]}")
        out.success(
            f"packed {counts} images in {len(manifest['shards'])} shards to "
            f"{out_dir}. Train with data: {{records: {out_dir}}}"
        )

    run_command(out, debug, job)
