"""MLflow tracking: what a run logs equals what it wrote; evaluate and export
attach to the same MLflow run; a tracking failure never costs the run."""

import csv
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.run import tracking
from finetune_cli.cli.main import app

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

# The runs were tracked in another process (an xdist worker, a CLI child):
# reading their file store here needs what finetune-cli set there.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

runner = CliRunner()


def _client(run):
    info = json.loads((run / tracking.FILE).read_text())
    return MlflowClient(info["tracking_uri"]), info["run_id"]


def _artifacts(client, run_id, path=None) -> set:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_logged_metrics_params_and_artifacts_equal_the_run_folder(finished_run):
    run = finished_run.run
    client, run_id = _client(run)
    # The default store: a local file store beside the runs.
    info = json.loads((run / tracking.FILE).read_text())
    assert info["tracking_uri"] == (run.parent.parent / "mlruns").as_uri()
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    rows = list(csv.DictReader(open(run / "history.csv")))
    phases = [p["name"] for p in finished_run.raw["phases"]]
    columns = [c for c in rows[0] if c not in ("epoch", "phase")]
    assert {"loss", "val_loss", "val_accuracy", "lr"} <= set(columns)
    for column in columns:
        history = client.get_metric_history(run_id, column)
        # Each epoch once, at its own step, with the value history.csv has.
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (int(r["epoch"]), pytest.approx(float(r[column]), rel=1e-6)) for r in rows
        ], column
    phase = sorted(client.get_metric_history(run_id, "phase"), key=lambda m: m.step)
    assert [phases[int(m.value) - 1] for m in phase] == [r["phase"] for r in rows]
    assert [logged.data.tags[f"phase.{i + 1}"] for i in range(2)] == phases
    # The resolved config, one parameter per key path.
    cfg = config_lib.load_config(run / "config.yaml").model_dump(mode="json")
    params = logged.data.params
    assert params == {k: str(v) for k, v in tracking.run_params(cfg).items()}
    assert float(params["phases.1.learning_rate"]) == 3e-4
    assert params["phases.1.optimizer.name"] == "sgd"
    # Final and test metrics, as in metrics.json.
    metrics = json.loads((run / "metrics.json").read_text())
    assert logged.data.metrics["test.accuracy"] == pytest.approx(
        metrics["test"]["accuracy"]
    )
    assert logged.data.metrics["val.loss"] == pytest.approx(metrics["val"]["loss"])
    assert (
        logged.data.metrics["phase.top.best_epoch"]
        == metrics["phases"][1]["best_epoch"]
    )
    tags = logged.data.tags
    assert tags["finetune.run_dir"] == str(run)
    assert tags["finetune.devices"].startswith("/physical_device:CPU:0")
    assert tags["finetune.version"]
    assert {
        "config.yaml",
        "labels.txt",
        "history.csv",
        "curves.png",
        "metrics.json",
        "environment.json",
        "model/best.keras",
        "eval/test/report.html",
        "eval/test/confusion_matrix.png",
        "eval/test/predictions.csv",
    } <= _artifacts(client, run_id)


@pytest.fixture
def tracked_copy(finished_run, tmp_path):
    """A copy of the run and of its MLflow store, tracked in the copy."""
    store = tmp_path / "mlruns"
    shutil.copytree(finished_run.run.parent.parent / "mlruns", store)
    run = shutil.copytree(finished_run.run, tmp_path / "run", symlinks=True)
    info = json.loads((run / tracking.FILE).read_text())
    info["tracking_uri"] = store.as_uri()
    (run / tracking.FILE).write_text(json.dumps(info))
    return run


def test_evaluate_and_export_attach_to_the_same_mlflow_run(tracked_copy):
    run = tracked_copy
    client, run_id = _client(run)
    result = runner.invoke(
        app,
        ["evaluate", str(run), "--name", "again", "--fail-under", "accuracy=0"]
        + ["--plain"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "eval" / "again" / "metrics.json").read_text())
    logged = client.get_run(run_id).data
    assert logged.metrics["eval.again.accuracy"] == pytest.approx(
        summary["summary"]["accuracy"]
    )
    result = runner.invoke(
        app, ["export", str(run), "--format", "keras", "--no-check", "--plain"]
    )
    assert result.exit_code == 0, result.output
    assert client.get_run(run_id).data.tags["finetune.export"] == str(run / "export")
    artifacts = _artifacts(client, run_id)
    assert {
        "eval/again/report.html",
        "eval/again/metrics.json",
        "eval/again/gates.json",
        "export/export/model.keras",
        "export/export/labels.txt",
    } <= artifacts


def test_unreachable_server_is_one_warning_and_nothing_else(tracked_copy, monkeypatch):
    # Nothing listens on port 9 of this machine: refused at once.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    info = json.loads((tracked_copy / tracking.FILE).read_text())
    info["tracking_uri"] = "http://127.0.0.1:9"
    (tracked_copy / tracking.FILE).write_text(json.dumps(info))
    result = runner.invoke(
        app, ["evaluate", str(tracked_copy), "--name", "offline", "--plain"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("MLflow tracking at http://127.0.0.1:9 failed") == 1
    assert "the run goes on" in result.output and "Traceback" not in result.output
    assert (tracked_copy / "eval" / "offline" / "report.html").is_file()

    warnings = []
    cfg = config_lib.validate(
        {
            "data": {"dir": "x"},
            "phases": [{"name": "a", "epochs": 1}],
            "experiment": {
                "output_dir": str(tracked_copy.parent / "runs"),
                "tracking": {"mlflow": {"tracking_uri": "http://127.0.0.1:9"}},
            },
        }
    )
    tracker = tracking.Tracker.start(
        cfg, tracked_copy, tags={}, params={"a": 1}, warn=warnings.append
    )
    assert tracker is None and len(warnings) == 1
    assert "http://127.0.0.1:9" in warnings[0]


def test_tracking_without_mlflow_is_a_config_error_before_anything_runs(
    monkeypatch, tmp_path
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlflow" else real(name, *a),
    )
    (tmp_path / "c.yaml").write_text(
        "data: {dir: nowhere}\n"
        "experiment: {output_dir: " + str(tmp_path / "runs") + ", "
        "tracking: {mlflow: {experiment: e}}}\n"
        "phases: [{name: a, epochs: 1}]\n"
    )
    result = runner.invoke(app, ["finetune", str(tmp_path / "c.yaml"), "--plain"])
    assert result.exit_code == 2, result.output
    assert "experiment.tracking.mlflow" in result.output
    assert "pip install 'finetune-cli[mlflow]'" in result.output
    assert not (tmp_path / "runs").exists()


def test_flatten_names_every_leaf_by_its_key_path():
    assert tracking.flatten({"a": {"b": [1, {"c": None}]}, "d": []}) == {
        "a.b.0": 1,
        "a.b.1.c": None,
        "d": [],
    }
    assert tracking.run_metrics(
        {
            "best_epoch": 3,
            "classes": ["x", "y"],
            "phases": [{"phase": "head", "val_accuracy": 0.5, "path": "features"}],
            "test": {"accuracy": 0.75, "report": "r.html"},
        }
    ) == {"best_epoch": 3.0, "phase.head.val_accuracy": 0.5, "test.accuracy": 0.75}
    # A phase named by the user can hold what MLflow refuses in a name.
    named = tracking.run_metrics({"phases": [{"phase": "fine:tune!", "x": 1}]})
    assert named == {"phase.fine_tune_.x": 1.0}


def test_a_failing_tracker_warns_once_and_stops_calling():
    calls, warnings = [], []

    class Down:
        def log_batch(self, *a, **k):
            calls.append("log_batch")
            raise ConnectionError("connection refused")

        def log_artifact(self, *a, **k):
            calls.append("log_artifact")

    tracker = tracking.Tracker.__new__(tracking.Tracker)
    tracker.uri, tracker.run_id, tracker.warn = "http://x", "r", warnings.append
    tracker.client, tracker.on = Down(), True
    tracker.log_metrics({"a": 1.0})
    tracker.log_metrics({"b": 2.0})
    tracker.log_path(__file__)
    assert calls == ["log_batch"] and len(warnings) == 1
    assert "connection refused" in warnings[0] and "the run goes on" in warnings[0]


@pytest.mark.heavy
def test_a_run_with_an_unreachable_server_completes(shapes_dir, tmp_path, monkeypatch):
    from conftest import tiny_config

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    raw = tiny_config(shapes_dir, tmp_path)
    raw["experiment"]["tracking"] = {"mlflow": {"tracking_uri": "http://127.0.0.1:9"}}
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["finetune", str(path), "--plain"])
    assert result.exit_code == 0, result.output
    assert result.output.count("MLflow tracking at http://127.0.0.1:9 failed") == 1
    run = tmp_path / "runs" / "t" / "latest"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert not (run / tracking.FILE).exists()
