"""Commands that train or prepare training: finetune, lr-find, tune, extract."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from finetune_cli.console import Output
from finetune_cli.cli.help import Command
from finetune_cli.cli.common import CompareToPromotedOpt
from finetune_cli.cli.common import ConfigArg
from finetune_cli.cli.common import DebugOpt
from finetune_cli.cli.common import PlainOpt
from finetune_cli.cli.common import PromoteGateOpt
from finetune_cli.cli.common import PromoteToleranceOpt
from finetune_cli.cli.common import QuietOpt
from finetune_cli.cli.common import SetOpt
from finetune_cli.cli.common import VerboseOpt
from finetune_cli.cli.common import load_config_file
from finetune_cli.cli.common import quiet_tensorflow
from finetune_cli.cli.common import raise_config
from finetune_cli.cli.common import run_command


app = typer.Typer()


class Algorithm(str, Enum):
    bayesian = "bayesian"
    random = "random"


class ExtractSplit(str, Enum):
    train = "train"
    val = "val"
    test = "test"
    all = "all"


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
        Optional[str],
        typer.Option(
            help="Complete an interrupted run in its folder, from its last "
            "saved state (uses the run's own config.yaml and split)."
        ),
    ] = None,
    promote_to: Annotated[
        Optional[str],
        typer.Option(
            help="After training, make this link point at the new model if it "
            "passes --fail-under and is not worse than the one promoted."
        ),
    ] = None,
    fail_under: PromoteGateOpt = None,
    compare_to_promoted: CompareToPromotedOpt = True,
    tolerance: PromoteToleranceOpt = 0.005,
    time_limit: Annotated[
        Optional[str],
        typer.Option(
            "--time-limit",
            metavar="DURATION",
            help="Stop after the epoch that would cross this much wall time "
            "(30m, 2h, 1h30m, or seconds), committed and resumable (exit 7). "
            "Default: experiment.time_limit. Also with --resume.",
            show_default=False,
        ),
    ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Run the config's phases and write a run directory.

    Exit codes: 0 done (and promoted), 2 config, 3 data, 4 not promoted
    (gate failed or not better), 5 interrupted (resumable with --resume),
    6 another run holds the experiment, 7 stopped by the time limit
    (resumable with --resume).

    Example: finetune-cli finetune flowers.yaml
    """
    out = Output(quiet=quiet, plain=plain, verbose=verbose)

    def job():
        if (config is None) == (resume is None):
            raise_config(
                "give a CONFIG to start a run, or --resume RUN_DIR to "
                "continue one (not both)"
            )
        if resume is not None:
            if set_:
                raise_config("--set cannot change a run being resumed")
            from finetune_cli.config import load_run_config

            from finetune_cli import remote

            run_dir = Path(resume)
            if remote.is_remote(resume):  # a run folder on object storage
                quiet_tensorflow()
                run_dir, _ = remote.local_run(resume)
            if not run_dir.is_dir():
                raise_config(f"--resume {resume}: no such run folder")
            cfg = load_run_config(run_dir)
        else:
            cfg = load_config_file(config, set_)
        if time_limit is not None:
            from finetune_cli.config.schema import duration_seconds

            try:
                duration_seconds(time_limit)
            except ValueError as e:
                raise_config(f"--time-limit: {e}")
        thresholds = None
        if promote_to is not None:
            from finetune_cli.evaluate import gates
            from finetune_cli.deploy import promotion

            thresholds = gates.parse_gates(fail_under, "--fail-under")
            promotion.check_target(promote_to)  # before hours of training
        elif fail_under:
            raise_config(
                "--fail-under on finetune goes with --promote-to; "
                "use `finetune-cli evaluate RUN --fail-under` otherwise"
            )
        quiet_tensorflow()
        from finetune_cli.train.job import finetune as run

        result = run(
            cfg,
            out,
            argv=sys.argv,
            resume=None if resume is None else run_dir,
            time_limit=time_limit,
        )
        if promote_to is not None and result.run_dir is not None:
            from finetune_cli.deploy import promotion

            promotion.run_promotion(
                result.run_dir,
                promote_to,
                out,
                fail_under=thresholds,
                compare=compare_to_promoted,
                tolerance=tolerance,
                run_remote=result.remote_dir,
            )

    run_command(out, debug, job)


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
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """The learning-rate range test for one phase: loss against an
    exponentially growing LR, a plot and a suggested learning rate.

    Example: finetune-cli lr-find flowers.yaml --phase 2
    """
    out = Output(quiet=quiet, plain=plain, verbose=verbose)

    def job():
        cfg = load_config_file(config, set_)
        quiet_tensorflow()
        from finetune_cli.search import lr_find as lr_find_lib

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

    run_command(out, debug, job)


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
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Search the config's `search:` spaces with KerasTuner.

    Trials that only change the head phases train on cached features
    (seconds each); others are whole runs. Writes trials.csv (ranked) and
    best.yaml (a config finetune accepts); rerun to continue a search.

    Example: finetune-cli tune flowers.yaml --trials 20
    """
    out = Output(quiet=quiet, plain=plain, verbose=verbose)

    def job():
        cfg = load_config_file(config, set_)
        quiet_tensorflow()
        from finetune_cli.search import tune as tune_lib
        from finetune_cli.search import trials as trials_lib

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
                    *[trials_lib.fmt_value(r["values"][k]) for k in keys],
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

    run_command(out, debug, job)


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
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    plain: PlainOpt = None,
):
    """Run the frozen base over the data; stream features to disk in shards.

    Reuses features whose content key (model, weights, size, data files)
    still matches, and says why when it recomputes.

    Example: finetune-cli extract flowers.yaml --split train
    """
    out = Output(quiet=quiet, plain=plain, verbose=verbose)

    def job():
        cfg = load_config_file(config, set_)
        quiet_tensorflow()
        from finetune_cli.cache import extract as extract_lib

        results = extract_lib.extract_command(cfg, out, split.value, out_dir)
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

    run_command(out, debug, job)
