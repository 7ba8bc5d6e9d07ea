"""A run folder written before the package layout changed still resumes,
evaluates and exports.

The folder is made by the old code itself: the last commit of the flat
layout, taken from this repository's history with `git archive`, run in a
process of its own and killed mid-phase at a fault point (faults.py). The
new code then resumes it to the end. Skips when the history is not there
(a shallow clone without that commit).
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli.cli.main import app
from conftest import lively_weights
from conftest import tiny_config

ROOT = Path(__file__).parent.parent
OLD_LAYOUT = "2ff424a"  # the last commit with finetune_cli/ as one flat folder
PHASES = [
    {"name": "head", "epochs": 2, "learning_rate": 1e-2},
    {"name": "top", "epochs": 2, "trainable": {"top": 6}, "learning_rate": 1e-3},
]


def _old_code(dest: Path) -> Path:
    probe = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD_LAYOUT}^{{commit}}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"commit {OLD_LAYOUT} is not in this clone's history")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", OLD_LAYOUT, "finetune_cli"],
        capture_output=True,
        check=True,
    ).stdout
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    assert (dest / "finetune_cli" / "trainer.py").is_file()  # the flat layout
    return dest


@pytest.mark.heavy
def test_a_run_folder_of_the_flat_layout_resumes_evaluates_and_exports(
    shapes_dir, tmp_path
):
    old = _old_code(tmp_path / "old")
    raw = tiny_config(shapes_dir, tmp_path, phases=PHASES)
    raw["model"]["weights"] = lively_weights(tmp_path / "pre.weights.h5")
    raw["experiment"]["name"] = "old"
    cfg = tmp_path / "old.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "PYTHONPATH": str(old),
        # Killed after the third epoch's commit: mid-way through phase 2,
        # with optimizer state, best weights and history in the state.
        "FINETUNE_CLI_FAULT": "epoch_saved@3",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    # The child runs the old code, not this checkout's.
    probe = [
        sys.executable,
        "-c",
        "import finetune_cli.trainer as t; print(t.__file__)",
    ]
    where = subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert where.stdout.startswith(str(old)), where.stdout + where.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_cli", "finetune", str(cfg), "--plain"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = [p for p in (tmp_path / "runs" / "old").iterdir() if p.name[0].isdigit()]
    assert (run / "resume.npz").is_file()  # the state the old code committed

    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--plain"])
    assert result.exit_code == 0, result.output
    assert f"resuming {run} after epoch 3" in result.output
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [r["phase"] for r in rows] == ["head", "head", "top", "top"]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [p["epochs_run"] for p in metrics["phases"]] == [2, 2]

    result = runner.invoke(app, ["evaluate", str(run), "--name", "again", "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["summary"]["accuracy"] == metrics["test"]["accuracy"]
    result = runner.invoke(app, ["export", str(run), "--format", "keras"])
    assert result.exit_code == 0, result.output
    assert (run / "export" / "model.keras").is_file()
