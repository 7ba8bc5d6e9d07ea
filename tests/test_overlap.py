"""Commands that overlap on one run or one folder. One process is held at a
named instant (faults.py's pause), the other command runs meanwhile; what
is promised (`run/lock.py`):

- `evaluate`, `export` and `promote` of a run that `finetune` is writing
  (or resuming) refuse with exit 6 naming the holder (`promote` waits);
  a `finetune --resume` of a run being evaluated refuses the same way;
- two exports into one folder: the second refuses with exit 6;
- `predict` and `runs list` read only files replaced atomically: they
  work on a consistent snapshot meanwhile.
"""

import json

import pytest

from typer.testing import CliRunner

from finetune_cli.cli.main import app
from finetune_cli.errors import EXIT_LOCKED

import cli_process
from conftest import copy_run
from conftest import stopped_run
from test_rundir import wait_for

runner = CliRunner()


def _hold(args, point, tmp_path):
    """Start `finetune-cli ARGS` and wait until it is held at `point`."""
    release = tmp_path / f"release-{point}"
    proc = cli_process.launch(
        [*args, "--plain"], pause=f"{point}={release}", stderr_to_stdout=True
    )
    waiting = tmp_path / f"release-{point}.waiting"
    assert wait_for(waiting.exists, proc), proc.communicate()[0][-3000:]
    return proc, release


def _let_go(proc, release):
    release.write_text("")
    output = proc.communicate(timeout=240)[0]
    return proc.returncode, output


def _refused(result, pid, doing):
    out = result.output
    assert result.exit_code == EXIT_LOCKED, out
    assert f"process {pid} ({doing})" in out, out
    assert "Traceback" not in out


def test_a_run_being_trained_is_not_evaluated_or_exported_under_it(
    finished_run, tmp_path, shapes_dir
):
    import yaml

    from conftest import tiny_config

    raw = tiny_config(shapes_dir, tmp_path, phases=[{"name": "head", "epochs": 2}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    # Its phase done and best.keras written, the report still to come.
    proc, release = _hold(["finetune", str(tmp_path / "c.yaml")], "phase_end", tmp_path)
    (run,) = [p for p in (tmp_path / "runs" / "t").iterdir() if p.name[0] == "2"]
    assert (run / "best.keras").is_file()
    before = sorted(p.name for p in run.iterdir())

    result = runner.invoke(app, ["evaluate", str(run), "--plain"])
    _refused(result, proc.pid, "finetune")
    result = runner.invoke(
        app,
        [
            "export",
            str(run),
            "--format",
            "keras",
            "--out",
            str(tmp_path / "e"),
            "--plain",
        ],
    )
    _refused(result, proc.pid, "finetune")
    assert not (tmp_path / "e").exists()

    # Readers work on what is there: the best model so far, the status.
    image = next(p for p in sorted(shapes_dir.rglob("*")) if p.is_file())
    result = runner.invoke(app, ["predict", str(run), str(image), "--plain"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["runs", "list", "--output-dir", str(tmp_path / "runs"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert [r["state"] for r in json.loads(result.output)] == ["running"]
    assert sorted(p.name for p in run.iterdir()) == before

    rc, output = _let_go(proc, release)
    assert rc == 0, output[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    result = runner.invoke(app, ["evaluate", str(run), "--plain"])
    assert result.exit_code == 0, result.output  # free once it is done


@pytest.mark.heavy  # a run to interrupt, then two commands on it
def test_a_run_being_evaluated_is_not_resumed_under_it(shapes_dir, tmp_path):
    run = stopped_run(shapes_dir, tmp_path)
    state = (run / "resume.npz").read_bytes()
    # Held after the metrics are computed, before the report is renamed in.
    proc, release = _hold(["evaluate", str(run), "--name", "x"], "report", tmp_path)
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--plain"])
    _refused(result, proc.pid, "evaluate")
    assert (run / "resume.npz").read_bytes() == state  # not one epoch more
    # Nothing of the held evaluation is visible as a report yet.
    assert not (run / "eval" / "x").exists()
    rc, output = _let_go(proc, release)
    assert rc == 0, output[-3000:]
    assert (run / "eval" / "x" / "report.html").is_file()
    assert not [p for p in (run / "eval").iterdir() if p.name.startswith(".")]
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--plain"])
    assert result.exit_code == 0, result.output


def test_two_exports_into_one_folder_the_second_is_refused(finished_run, tmp_path):
    run = copy_run(finished_run.run, tmp_path / "run")
    other = copy_run(finished_run.run, tmp_path / "other")
    target = tmp_path / "shared-export"
    args = ["export", str(run), "--format", "keras", "--out", str(target)]
    proc, release = _hold(args, "export_written", tmp_path)
    result = runner.invoke(
        app,
        ["export", str(other), "--format", "keras", "--out", str(target), "--plain"],
    )
    _refused(result, proc.pid, "export")
    rc, output = _let_go(proc, release)
    assert rc == 0, output[-3000:]
    meta = json.loads((target / "metadata.json").read_text())
    assert meta["class_names"] == ["circle", "square", "star", "triangle"]
    # And once it is there, a second export without --force does not replace it.
    result = runner.invoke(
        app,
        ["export", str(other), "--format", "keras", "--out", str(target), "--plain"],
    )
    assert result.exit_code == 2 and "--force" in result.output
