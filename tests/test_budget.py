"""The time limit: a run stops after the epoch that would let the next one
cross it, committed and resumable (exit 7), with a partial report; the
clock is faults.py's fake one, so no test waits for a deadline."""

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import faults
from finetune_cli.cli.main import app
from finetune_cli.errors import EXIT_CONFIG
from finetune_cli.errors import EXIT_TIME_LIMIT
from finetune_cli.train.budget import Budget
from conftest import tiny_config

PHASES = [
    {"name": "head", "epochs": 2, "learning_rate": 1e-2},
    {"name": "top", "epochs": 2, "trainable": {"top": 6}, "learning_rate": 1e-3},
]


@pytest.fixture
def fake_clock(monkeypatch):
    """Every faults.clock() call is 60 s after the one before."""
    monkeypatch.setenv("FINETUNE_CLI_CLOCK_STEP", "60")
    monkeypatch.setattr(faults, "_ticks", [0])


def test_the_budget_stops_when_the_next_epoch_would_cross_the_limit(fake_clock):
    from finetune_cli.errors import TimeLimitReached

    budget = Budget("150s")  # starts at 60
    budget.after_epoch(1, "RUN")  # 120: 60 s in, next ~60 s: 120 <= 150
    with pytest.raises(TimeLimitReached) as e:
        budget.after_epoch(2, "RUN")  # 180: 120 s in, next ~60 s: 180 > 150
    assert "after epoch 2" in str(e.value) and "--resume RUN" in str(e.value)
    budget.after_epoch(3, "RUN", more=False)  # the last epoch: nothing to stop
    Budget(None).after_epoch(1, "RUN")  # no limit: never stops


def history(run):
    return [int(r["epoch"]) for r in csv.DictReader(open(run / "history.csv"))]


# A whole run and its resume (or two runs): `make test-heavy` (CI).
@pytest.mark.heavy
def test_a_run_stopped_by_its_time_limit_resumes_to_the_end(
    shapes_dir, tmp_path, fake_clock
):
    raw = tiny_config(shapes_dir, tmp_path, phases=PHASES)
    raw["experiment"]["time_limit"] = "150s"  # the config key
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", str(path), "--plain"])
    assert result.exit_code == EXIT_TIME_LIMIT, result.output
    assert "stopped: time limit 150s" in result.output
    assert "Traceback" not in result.output
    (run,) = (tmp_path / "runs" / "t").glob("2*")
    assert history(run) == [1, 2]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["resumable"] is True
    assert "time limit" in status["reason"]
    assert (run / "resume.npz").is_file()  # committed
    assert (run / "eval" / "partial" / "report.html").is_file()
    assert (run / "curves.png").is_file()
    assert not (run / "eval" / "test").exists()  # not presented as done
    assert "stopped: time limit" in (run / "log.txt").read_text()

    # --time-limit overrides the config's for a resumed session, and a
    # resume is not refused for it: 90 s (as plain seconds) lets one epoch run.
    faults._ticks[0] = 0
    result = runner.invoke(
        app, ["finetune", "--resume", str(run), "--time-limit", "90", "--plain"]
    )
    assert result.exit_code == EXIT_TIME_LIMIT, result.output
    assert history(run) == [1, 2, 3]
    faults._ticks[0] = 0
    result = runner.invoke(
        app, ["finetune", "--resume", str(run), "--time-limit", "1d", "--plain"]
    )
    assert result.exit_code == 0, result.output
    assert history(run) == [1, 2, 3, 4]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


@pytest.mark.parametrize("value", ["soon", "0", "-5m", "30 minutes"])
def test_a_bad_time_limit_is_a_config_error_before_anything(
    shapes_dir, tmp_path, value
):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(tiny_config(shapes_dir, tmp_path)))
    result = CliRunner().invoke(app, ["finetune", str(path), "--time-limit", value])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "--time-limit" in result.output and "duration" in result.output
    assert not (tmp_path / "runs").exists()
    raw = tiny_config(shapes_dir, tmp_path)
    raw["experiment"]["time_limit"] = True
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == EXIT_CONFIG
    assert "experiment.time_limit" in result.output
