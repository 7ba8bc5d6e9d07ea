"""Damaged run folders, by class: any of a run's own files removed, emptied,
truncated or replaced by garbage, given to every command that reads a run
(`finetune --resume`, `evaluate`, `export`, `predict`, `promote`).

Each case asserts the documented exit code (8, damaged file; or success
where the command does not need that file, or rewrites it), a message
naming the file at fault and what to do, no traceback, and every file of
the folder byte-identical afterwards when the command failed.

The quick suite runs three files of each command with one damage each,
the four damages rotating; the heavy suite runs all four on every file.
"""

import itertools
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli.cli.main import app
from finetune_cli.errors import EXIT_DAMAGED

from conftest import copy_run
from conftest import stopped_run
from conftest import tiny_config

runner = CliRunner()
DAMAGES = ("remove", "empty", "truncate", "garbage")


def damage(path, how):
    if how == "remove":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: max(1, len(data) // 2)])
    else:
        path.write_bytes(b"\x00\xffnot what was written\xfe" * 8)


# What each command reads of a run, and whether a damaged copy stops it
# (True: exit 8 naming the file) or it does without / rewrites it (False).
READS = {
    "evaluate": {
        "best.keras": True,
        "labels.txt": True,
        "split.json": True,
        "history.csv": False,  # the report says the curves are missing
        "status.json": False,
        "config.yaml": False,  # the recorded split is enough
        "metrics.json": False,
    },
    "export": {
        "best.keras": True,
        "labels.txt": True,
        "split.json": True,
        "config.yaml": True,  # the preprocessing recorded in metadata
        "metrics.json": True,  # copied into metadata.json
    },
    "predict": {"best.keras": True, "labels.txt": True, "split.json": False},
    "promote": {
        "status.json": True,  # only a completed run is promoted
        "best.keras": True,
        "labels.txt": True,
        "split.json": True,
        "history.csv": False,
    },
    "resume": {
        "resume.npz": True,
        "config.yaml": True,
        "split.json": True,
        "labels.txt": False,  # a view of the split: rewritten
        "status.json": False,  # rewritten
        "history.csv": False,  # a view of the state: rewritten
        "environment.json": False,
    },
}
# A removed file the command does not need is not an error either way.
NOT_FATAL_WHEN = {("export", "metrics.json", "remove")}


def _cases(all_damages):
    cases = []
    turn = itertools.cycle(DAMAGES)
    for command, files in READS.items():
        # Quick suite: the first two files of each command (the ones it
        # cannot do without, then one it does without or rewrites).
        names = list(files) if all_damages else list(files)[:2] + list(files)[-1:]
        for name in names:
            fatal = files[name]
            for how in DAMAGES if all_damages else (next(turn),):
                heavy = all_damages
                cases.append(
                    pytest.param(
                        command,
                        name,
                        how,
                        fatal and (command, name, how) not in NOT_FATAL_WHEN,
                        id=f"{command}-{name}-{how}",
                        marks=[pytest.mark.heavy] if heavy else [],
                    )
                )
    return cases


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, shapes_dir):
    return stopped_run(shapes_dir, tmp_path_factory.mktemp("interrupted"))


def _argv(command, run, tmp_path, image):
    return {
        "evaluate": ["evaluate", str(run), "--out", str(tmp_path / "ev")],
        "export": [
            *("export", str(run), "--format", "keras"),
            *("--out", str(tmp_path / "export")),
        ],
        "predict": ["predict", str(run), str(image)],
        "promote": ["promote", str(run), "--to", str(tmp_path / "live" / "m")],
        "resume": ["finetune", "--resume", str(run)],
    }[command] + ["--plain"]


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _check(command, name, how, fatal, source, tmp_path, shapes_dir):
    run = copy_run(source, tmp_path / "run")
    damage(run / name, how)
    before = _snapshot(run)
    image = next(p for p in sorted(shapes_dir.rglob("*")) if p.is_file())
    result = runner.invoke(app, _argv(command, run, tmp_path, image))
    out = result.output
    assert "Traceback" not in out and "please report" not in out, out
    if not fatal:
        assert result.exit_code == 0, out
        return
    assert result.exit_code == EXIT_DAMAGED, out
    assert f"damaged file: {run / name}:" in out, out
    # What to do is said: restore, retrain, resume or another way round.
    assert any(w in out for w in ("restore", "train again", "start a new run")), out
    assert _snapshot(run) == before, "the failed attempt changed the run folder"
    for made in ("ev", "export", "live"):
        assert not (tmp_path / made).exists() or not any(
            (tmp_path / made).rglob("*.json")
        )


@pytest.mark.parametrize("command,name,how,fatal", _cases(False) + _cases(True))
def test_a_damaged_run_file_is_named_and_nothing_is_made_worse(
    command, name, how, fatal, finished_run, interrupted_run, tmp_path, shapes_dir
):
    source = interrupted_run if command == "resume" else finished_run.run
    _check(command, name, how, fatal, source, tmp_path, shapes_dir)


def test_the_resumed_run_rewrites_its_views_and_completes(interrupted_run, tmp_path):
    run = copy_run(interrupted_run, tmp_path / "run")
    (run / "labels.txt").write_text("garbage\n")
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--plain"])
    assert result.exit_code == 0, result.output
    assert (run / "labels.txt").read_text().split() == [
        "circle",
        "square",
        "star",
        "triangle",
    ]
    shutil.rmtree(run)


# Caches built, damaged and rebuilt by whole commands: `make test-heavy` (CI).
@pytest.mark.heavy
def test_damaged_caches_are_rebuilt_not_trusted(shapes_dir, tmp_path):
    """A truncated feature shard, a garbled pre-flight verdict file: the
    next run recomputes them (and says why) instead of failing or reading
    garbage."""
    raw = tiny_config(shapes_dir, tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    argv = ["finetune", str(tmp_path / "c.yaml"), "--plain"]
    assert runner.invoke(app, argv).exit_code == 0
    shard = next((tmp_path / "features").rglob("train/shard-*.npz"))
    damage(shard, "truncate")
    damage(tmp_path / "features" / "preflight.json", "garbage")
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "damaged" in result.output  # the shard: said, then recomputed
    import numpy as np

    with np.load(shard) as z:  # whole again
        assert z["features"].shape[0] == 16


def test_an_activation_cache_with_a_short_row_file_is_not_reused(tmp_path):
    import numpy as np

    from finetune_cli.cache import rows

    folder = tmp_path / "act"
    folder.mkdir()
    manifest = {"rows": {"train": 4, "val": 2}, "views": 1, "dim": 3}
    manifest["dtype"] = "float16"
    (folder / "manifest.json").write_text(__import__("json").dumps(manifest))
    rows.write_rows(folder / "train-view0.npy", 4, 3, "float16", [np.ones((4, 3))])
    rows.write_rows(folder / "val.npy", 2, 3, "float16", [np.ones((2, 3))])
    assert rows.intact(folder) == manifest
    damage(folder / "val.npy", "truncate")
    assert rows.intact(folder) is None
    (folder / "val.npy").unlink()
    assert rows.intact(folder) is None
