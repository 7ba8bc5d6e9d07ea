"""`finetune-cli benchmark RUN`: every exported format scored on the run's
recorded test split, timed, sized; a --min-accuracy gate names each format
below it (exit 4) and leaves the files as they were."""

import json

import pytest
from typer.testing import CliRunner

from finetune_cli.cli.main import app
from finetune_cli.errors import EXIT_CONFIG
from finetune_cli.errors import EXIT_GATE
from conftest import copy_run

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    run = copy_run(finished_run.run, tmp_path_factory.mktemp("bench") / "run")
    result = runner.invoke(
        app, ["export", str(run), "--format", "keras,tflite", "--no-check"]
    )
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.heavy
def test_every_format_is_scored_on_the_test_split_timed_and_sized(exported):
    result = runner.invoke(app, ["benchmark", str(exported), "--json", "--batch", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((exported / "export" / "benchmark.json").read_text())
    split = json.loads((exported / "split.json").read_text())
    assert report["images"] == len(split["files"]["test"]) == 8
    end_of_run = json.loads((exported / "metrics.json").read_text())["test"]
    rows = {r["artifact"]: r for r in report["artifacts"]}
    assert set(rows) == {"keras", "tflite"}
    for r in rows.values():
        # The float formats agree with the run's own test accuracy.
        assert r["accuracy"] == pytest.approx(end_of_run["accuracy"])
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"]
        assert r["throughput"] > 0
        assert r["size_bytes"] == (exported / "export" / r["file"]).stat().st_size


@pytest.mark.heavy
def test_the_accuracy_gate_names_each_format_below_it_and_keeps_the_files(exported):
    folder = exported / "export"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = runner.invoke(app, ["benchmark", str(exported), "--min-accuracy", "1.0"])
    accuracy = json.loads((exported / "metrics.json").read_text())["test"]["accuracy"]
    if accuracy == 1.0:
        pytest.skip("the tiny run scored 1.0: nothing is below the gate")
    assert result.exit_code == EXIT_GATE, result.output
    text = " ".join(result.output.split())
    assert "keras: accuracy" in text and "tflite: accuracy" in text
    assert "< 1" in text and "Traceback" not in text
    report = json.loads((folder / "benchmark.json").read_text())
    assert report["passed"] is False and len(report["failures"]) == 2
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert {k: v for k, v in after.items() if k != "benchmark.json"} == {
        k: v for k, v in before.items() if k != "benchmark.json"
    }


def test_a_run_without_an_export_is_told_to_export_first(finished_run, tmp_path):
    run = copy_run(finished_run.run, tmp_path / "run")
    result = runner.invoke(app, ["benchmark", str(run)])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "no export here" in result.output
    assert f"finetune-cli export {run}" in " ".join(result.output.split())
