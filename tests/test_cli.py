"""The command line itself: help text (a snapshot, no type placeholders)
and shell completion."""

import os
import re
from pathlib import Path

from typer.testing import CliRunner

from finetune_cli.cli.main import app
from typer.main import get_command as typer_main

runner = CliRunner()
SNAPSHOT = Path(__file__).parent / "snapshots" / "help.txt"
COMMANDS = [
    [],
    ["finetune"],
    ["extract"],
    ["evaluate"],
    ["export"],
    ["predict"],
    ["promote"],
    ["init"],
    ["synth"],
    ["pack"],
    ["runs", "list"],
    ["config", "show"],
    ["config", "validate"],
    ["config", "schema"],
]


def _help_text() -> str:
    parts = []
    for cmd in COMMANDS:
        result = runner.invoke(
            app,
            [*cmd, "--help"],
            env={"COLUMNS": "100", "NO_COLOR": "1"},
            prog_name="finetune-cli",
        )
        assert result.exit_code == 0, result.output
        lines = [line.rstrip() for line in result.stdout.splitlines()]
        parts.append(f"$ finetune-cli {' '.join([*cmd, '--help'])}\n")
        parts.append("\n".join(lines).strip("\n") + "\n\n")
    return "".join(parts)


def test_help_matches_snapshot_and_has_no_type_placeholders():
    text = _help_text()
    # Typer's own placeholders: <bool>, <path>, <list[Path]>, {target}.
    assert not re.search(r"<(bool|path|int|float|str|list)\b|\{[a-z_]+\}", text), [
        line for line in text.splitlines() if re.search(r"<\w+|\{[a-z_]+\}", line)
    ]
    assert "Usage: finetune-cli predict [OPTIONS] TARGET IMAGES..." in text, text
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text(), (
        "help text changed; review it and rerun with UPDATE_SNAPSHOTS=1"
    )


def test_shell_completion_is_offered():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert "--install-completion" in result.stdout
    result = runner.invoke(
        app,
        [],
        env={
            "_FINETUNE_CLI_COMPLETE": "complete_bash",
            "COMP_WORDS": "finetune-cli ev",
            "COMP_CWORD": "1",
        },
        prog_name="finetune-cli",
    )
    assert "evaluate" in result.stdout


def test_root_help_lists_every_exit_code():
    from finetune_cli import errors

    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert codes == {1, 2, 3, 4, 5, 6, 7, 8, 9}
    for code in codes | {0}:
        assert re.search(rf"[:,] {code} [a-z]", text), code


def test_synth_writes_the_classes_and_never_replaces_without_force(tmp_path):
    from PIL import Image

    out = tmp_path / "shapes"
    args = ["synth", str(out), "--task", "target", "--per-class", "3", "--size", "24"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "cross",
        "diamond",
        "hexagon",
        "ring",
    ]
    files = sorted(out.glob("*/*"))
    assert len(files) == 12
    with Image.open(files[0]) as im:
        assert im.size == (24, 24)
    before = {p: p.read_bytes() for p in files}
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--force" in result.output
    assert {p: p.read_bytes() for p in sorted(out.glob("*/*"))} == before
    result = runner.invoke(app, [*args, "--per-class", "2", "--force"])
    assert result.exit_code == 0 and len(list(out.glob("*/*"))) == 8


def test_help_at_80_columns_shows_whole_option_names_and_an_example():
    group = typer_main(app)
    commands = []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            commands.append((path, cmd))

    walk(group, [])
    assert len(commands) >= 15
    for path, cmd in commands:
        result = runner.invoke(
            app, [*path, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"}
        )
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), path
        assert "…" not in result.stdout, (path, result.stdout)
        text = " ".join(result.stdout.split())
        for param in cmd.params:
            for name in [*param.opts, *param.secondary_opts]:
                if name.startswith("--"):
                    assert name in text, (path, name)
        assert "Example: finetune-cli " + " ".join(path) in text, path
