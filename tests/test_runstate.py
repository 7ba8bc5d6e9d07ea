"""Resume from any instant: a run killed at every named crash point
(faults.py) completes with every epoch exactly once and the weights of an
uninterrupted run."""

import csv
import json
import os

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.run import state as runstate
from finetune_cli.train import job as trainer
from finetune_cli.cli.main import app
from finetune_cli.console import Output
from finetune_cli.errors import ConfigError

import cli_process
from conftest import lively_weights
from conftest import tiny_config

PHASES = [
    {
        "name": "head",
        "epochs": 2,
        "learning_rate": 1e-2,
        "callbacks": {"reduce_lr_on_plateau": {"patience": 1, "factor": 0.5}},
    },
    {
        "name": "top",
        "epochs": 3,
        "trainable": {"top": 6},
        "optimizer": {"name": "sgd", "momentum": 0.9},
        "learning_rate": 1e-3,
        "schedule": "cosine",
        "callbacks": {"early_stopping": {"patience": 50}},
    },
]
# In the order a run reaches them; each kill is followed by a resume that
# is killed at the next one. (name, what must be true right after the kill)
CHAIN = [
    "run_created",  # folder created, no epoch yet
    "extract",  # inside the activation cache the head's features come from
    "epoch_saved",  # epoch 1 committed, history.csv not yet written
    "phase_end",  # head phase done and committed
    "phase_first_batch",  # first batch of the top phase
    "model_save@2",  # a .keras file half-written
    "epoch_saved",  # mid-phase, with optimizer and callback state
    "before_final_eval",  # training over, end-of-run evaluation next
    "report",  # inside the held-out report
]


def write_config(tmp_path, data_dir, name):
    raw = tiny_config(data_dir, tmp_path, phases=PHASES)
    raw["model"]["weights"] = lively_weights(tmp_path / "pre.weights.h5")
    raw["experiment"]["name"] = name
    raw["experiment"]["tracking"] = {"mlflow": {}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path


def launch(args, fault=None):
    return cli_process.run(args + ["--plain"], fault=fault)


def history(run):
    path = run / "history.csv"
    return list(csv.DictReader(open(path))) if path.is_file() else []


def weights(path):
    import keras

    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    return [np.asarray(w) for w in model.weights]


@pytest.mark.heavy
def test_killed_at_every_point_resumes_to_the_uninterrupted_result(
    shapes_dir, tmp_path
):
    raw, cfg = write_config(tmp_path, shapes_dir, "chain")
    root = tmp_path / "runs" / "chain"

    first = launch(["finetune", str(cfg)], CHAIN[0])
    assert first.returncode == -9, first.stdout[-2000:] + first.stderr[-2000:]
    (run,) = [p for p in root.iterdir() if p.name[0].isdigit()]
    # Died before any epoch: the folder is there, resumable, and reads as
    # interrupted (its process is gone), not running.
    listed = CliRunner().invoke(
        app, ["runs", "list", "--output-dir", str(tmp_path / "runs"), "--json"]
    )
    (row,) = json.loads(listed.stdout)
    assert row["state"] == "interrupted" and row["resumable"] is True
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"

    seen_temporary = False
    for fault in CHAIN[1:]:
        result = launch(["finetune", "--resume", str(run)], fault)
        assert result.returncode == -9, (
            f"{fault}: " + result.stdout[-2000:] + result.stderr[-2000:]
        )
        if fault.startswith("model_save"):
            seen_temporary = any(
                p.name.startswith(".") and p.suffix == ".keras" for p in run.iterdir()
            )
        if fault == "extract":
            # The head's features come from the top phase's activation
            # cache: the kill fell while that cache was being written.
            cache = tmp_path / "features" / "chain" / "activations"
            assert list(cache.glob(".*.partial-*"))
    assert seen_temporary, "the model_save kill left no half-written file"

    final = launch(["finetune", "--resume", str(run)])
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "resuming" in final.stdout

    # Every epoch exactly once, in phase order; the run is complete and
    # nothing temporary is left, in the run or in the feature cache.
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["phase"] for r in rows] == ["head"] * 2 + ["top"] * 3
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert not (run / runstate.FILE).exists()
    assert not [p for p in run.rglob(".*")]
    assert not list((tmp_path / "features" / "chain").glob(".*"))
    assert not list((tmp_path / "features" / "chain" / "activations").glob(".*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [p["epochs_run"] for p in metrics["phases"]] == [2, 3]
    assert (run / "eval" / "test" / "report.html").is_file()

    # The same config, never interrupted, in this process.
    raw["experiment"]["name"] = "straight"
    ref = trainer.finetune(
        config_lib.validate(raw), Output(file=open(os.devnull, "w"))
    ).run_dir
    ref_rows = history(ref)
    for key in ("loss", "val_loss", "lr", "iterations"):
        assert [float(r[key]) for r in rows] == pytest.approx(
            [float(r[key]) for r in ref_rows], rel=1e-5, abs=1e-6
        ), key
    assert len({round(float(r["loss"]), 4) for r in rows}) > 3  # they vary
    for name in ("best.keras", "last.keras"):
        for a, b in zip(weights(run / name), weights(ref / name), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == ref_metrics["test"]["accuracy"]
    assert metrics["best_epoch"] == ref_metrics["best_epoch"]

    again = launch(["finetune", "--resume", str(run)])
    assert again.returncode == 2 and "already completed" in again.stderr

    # MLflow saw the same run: each epoch once, across nine kills.
    from mlflow.tracking import MlflowClient

    info = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    assert client.get_run(info["run_id"]).info.status == "FINISHED"
    for key in ("loss", "val_loss", "lr", "iterations"):
        logged = client.get_metric_history(info["run_id"], key)
        assert sorted((m.step, m.value) for m in logged) == [
            (int(r["epoch"]), pytest.approx(float(r[key]))) for r in rows
        ], key


def test_resume_refuses_a_changed_config_and_names_the_key(tmp_path):
    state = runstate.RunState(epoch=3)
    path = tmp_path / runstate.FILE
    config = {"phases": [{"epochs": 5}], "data": {"batch_size": 8}}
    state.save(path, config=config, versions={"finetune_cli": "x"})
    loaded = runstate.load(path, config=config, versions={})
    assert loaded.epoch == 3
    assert loaded.versions == {"finetune_cli": "x"}  # what wrote it
    edited = {"phases": [{"epochs": 3}], "data": {"batch_size": 8}}
    from finetune_cli.errors import DamagedFile

    with pytest.raises(DamagedFile, match=r"phases\.0\.epochs \(5 -> 3\)"):
        runstate.load(path, config=edited, versions={})


def test_state_of_another_format_is_refused(tmp_path, monkeypatch):
    path = tmp_path / runstate.FILE
    runstate.RunState().save(path, config={}, versions={"finetune_cli": "0.0"})
    monkeypatch.setattr(runstate, "FORMAT", runstate.FORMAT + 1)
    with pytest.raises(
        ConfigError,
        match=r"written by finetune-cli 0\.0 "
        r"\(state format \d+\)",
    ):
        runstate.load(path, config={}, versions={"finetune_cli": "9"})


def test_restoring_a_different_number_of_variables_is_an_error():
    import keras

    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    with pytest.raises(
        ConfigError,
        match=r"saved model has 1 variables, the "
        r"rebuilt one has 2",
    ):
        runstate.assign(layer.weights, [np.zeros((3, 2))], "model")
    with pytest.raises(ConfigError, match=r"has shape \(4, 2\)"):
        runstate.assign(layer.weights, [np.zeros((4, 2)), np.zeros(2)], "model")
