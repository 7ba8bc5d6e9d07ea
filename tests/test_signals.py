"""Ctrl-C and SIGTERM anywhere: each command is held at a named instant in
the middle of its work (faults.py's pause), signalled there, and must exit
5 with no partial output presented as complete (outputs are written under
temporary names and renamed last; a run's status says interrupted).

`finetune` itself is covered in test_rundir.py (SIGTERM) and
test_distribute.py (a cluster's workers).
"""

import json
import signal

import pytest
import yaml

from finetune_cli.errors import EXIT_INTERRUPTED

import cli_process
from conftest import copy_run
from conftest import tiny_config
from test_rundir import wait_for


def _config(shapes_dir, tmp_path, **extra):
    raw = tiny_config(shapes_dir, tmp_path, **extra)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _hidden(folder):
    """Temporaries left behind (names starting with a dot), if any."""
    if not folder.exists():
        return []
    return [p for p in folder.rglob(".*") if p.name not in (".lock",)]


def _case(command, tmp_path, shapes_dir, run):
    """(argv, the point to hold it at, what must not look complete after)."""
    if command == "preflight":
        cfg = _config(shapes_dir, tmp_path)
        return ["finetune", cfg], "preflight", [tmp_path / "runs"]
    if command == "extract":
        cfg = _config(shapes_dir, tmp_path)
        return ["extract", cfg], "extract", [tmp_path / "features"]
    if command == "export":
        return (
            ["export", run, "--format", "keras,tflite", "--out", tmp_path / "e"],
            "export_written",
            [tmp_path / "e"],
        )
    if command == "evaluate":
        return ["evaluate", run, "--name", "x"], "report", [run / "eval" / "x"]
    if command == "predict":
        files = sorted(p for p in shapes_dir.rglob("*") if p.is_file())[:4]
        return (
            ["predict", run, *files, "--out", tmp_path / "p.csv"],
            "predict_row",
            [tmp_path / "p.csv"],
        )
    if command == "tune":
        search = {"phases.0.learning_rate": {"choice": [1e-3, 1e-2]}}
        cfg = _config(shapes_dir, tmp_path, search=search)
        tune = tmp_path / "runs" / "t" / "tune"
        return (
            ["tune", cfg, "--trials", "2"],
            "trial",
            [tune / "best.yaml", tune / "trials.csv"],
        )
    if command == "audit":
        return ["audit", run, "--out", tmp_path / "a"], "audit_report", [tmp_path / "a"]
    raise AssertionError(command)


# SIGTERM in the quick suite; Ctrl-C (SIGINT) takes the same path, heavy.
SIGNALS = [
    pytest.param(signal.SIGTERM, id="term"),
    pytest.param(signal.SIGINT, id="int", marks=pytest.mark.heavy),
]


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize(
    "command",
    ["preflight", "extract", "export", "evaluate", "predict", "tune", "audit"],
)
def test_a_signal_mid_command_exits_5_with_nothing_half_done(
    command, sig, finished_run, shapes_dir, tmp_path
):
    run = copy_run(finished_run.run, tmp_path / "run")
    argv, point, outputs = _case(command, tmp_path, shapes_dir, run)
    release = tmp_path / "release"
    proc = cli_process.launch(
        [*argv, "--plain"], pause=f"{point}={release}", stderr_to_stdout=True
    )
    assert wait_for((tmp_path / "release.waiting").exists, proc), proc.communicate()[0][
        -3000:
    ]
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted" in output and "Traceback" not in output, output[-3000:]
    for p in outputs:
        if command == "preflight":  # no run folder was made
            assert not p.exists() or not list(p.rglob("status.json")), output
        elif command == "extract":
            assert not list(p.rglob("manifest.json")), output
        else:
            assert not p.exists(), f"{p} presented as complete"
    for folder in (tmp_path / "features", run / "eval", tmp_path):
        assert not [h for h in _hidden(folder) if "partial" in h.name], output
    if command == "tune":
        meta = json.loads((tmp_path / "runs" / "t" / "tune" / "tune.json").read_text())
        assert "best" not in meta
