"""Calibration (a temperature fitted on val, folded into the model) and
selective prediction (unknown below a threshold)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import copy_run
from finetune_cli.cli.main import app
from finetune_cli.evaluate import calibration
from finetune_cli.evaluate import metrics as metrics_lib
from finetune_cli.evaluate import selective

runner = CliRunner()


def _overconfident(n, temperature, seed):
    """Labels drawn from softmax(z) and a model's probabilities
    softmax(z * temperature): over-confident by `temperature`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 5))
    true_p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in true_p])
    hot = np.exp(z * temperature)
    return labels, hot / hot.sum(1, keepdims=True)


def test_the_fitted_temperature_undoes_over_confidence_on_held_out_images():
    val_labels, val_probs = _overconfident(4000, 3.0, seed=0)
    t = calibration.fit_temperature(val_probs, val_labels)
    assert t == pytest.approx(3.0, rel=0.1)
    test_labels, test_probs = _overconfident(4000, 3.0, seed=1)
    after = calibration.with_temperature(test_probs, t)
    ece = metrics_lib.expected_calibration_error
    assert ece(test_labels, after) < 0.5 * ece(test_labels, test_probs)
    assert metrics_lib.log_loss(test_labels, after) < metrics_lib.log_loss(
        test_labels, test_probs
    )
    # Accuracy is untouched: the order of the classes is.
    np.testing.assert_array_equal(after.argmax(1), test_probs.argmax(1))
    # The inverse temperature gives the probabilities back.
    np.testing.assert_allclose(
        calibration.with_temperature(after, 1 / t), test_probs, atol=1e-9
    )


def test_folding_the_temperature_into_the_output_layer_tempers_the_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(hidden)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(0, 3, (32, 6)).astype("float32")
    before = model.predict(x, verbose=0)
    calibration.fold_into(model, 2.5)
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        calibration.with_temperature(before, 2.5),
        atol=1e-6,
    )


def test_a_run_is_calibrated_and_its_report_shows_before_and_after(finished_run):
    rec = json.loads((finished_run.run / "calibration.json").read_text())
    assert rec["method"] == "temperature" and rec["split"] == "val"
    assert rec["temperature"] > 0 and rec["images"] > 0
    assert rec["log_loss_after"] <= rec["log_loss_before"] + 1e-9
    report = finished_run.run / "eval" / "test"
    metrics = json.loads((report / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["temperature"] == pytest.approx(rec["temperature"])
    assert cal["ece_after"] == pytest.approx(metrics["summary"]["ece"])
    assert (report / "reliability.png").is_file()
    assert (report / "coverage.png").is_file()
    assert 'id="calibration"' in (report / "report.html").read_text()
    assert "calibration: temperature" in finished_run.output


def test_calibration_none_leaves_the_probabilities_as_trained(shapes_dir, tmp_path):
    import io

    from conftest import tiny_config
    from finetune_cli import config as config_lib
    from finetune_cli.console import Output
    from finetune_cli.train import job as trainer

    raw = tiny_config(shapes_dir, tmp_path, calibration="none")
    result = trainer.finetune(config_lib.validate(raw), Output(file=io.StringIO()))
    assert not (result.run_dir / "calibration.json").exists()
    metrics = json.loads(
        (result.run_dir / "eval" / "test" / "metrics.json").read_text()
    )
    assert "calibration" not in metrics and "selective" in metrics


def test_selective_prediction_trades_coverage_for_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1000)
    conf = rng.uniform(0.34, 1.0, 1000)
    # Right more often when confident: a calibrated-looking model.
    right = rng.uniform(0, 1, 1000) < conf
    pred = np.where(right, labels, (labels + 1) % 3)
    probs = np.full((1000, 3), 0.0)
    probs[np.arange(1000), pred] = conf
    probs[np.arange(1000), (pred + 1) % 3] = 1 - conf
    curve = selective.coverage_curve(labels, probs)
    assert curve[0]["coverage"] == 1.0
    covered = [r["coverage"] for r in curve]
    assert covered == sorted(covered, reverse=True)
    at = {r["coverage"]: r for r in selective.accuracy_at_coverage(labels, probs)}
    assert at[0.5]["accuracy"] > at[1.0]["accuracy"] + 0.05
    # Images of none of the classes, less confident: rejected more often
    # than in-class ones at the threshold that keeps 95% of those.
    unknown_conf = rng.uniform(0.34, 0.7, 500)
    u = selective.unknown_rejection(probs.max(1), unknown_conf, 0.95)
    assert u["kept_in_class"] >= 0.95
    assert u["rejected"] > 1 - u["kept_in_class"]
    assert u["threshold"] == selective.threshold_for_coverage(probs.max(1), 0.95)


def test_evaluate_unknown_and_predict_reject_agree_on_one_threshold(
    finished_run, tmp_path
):
    """evaluate --unknown's rejected share is what predict --reject-below
    answers `unknown` for, at the threshold evaluate reports; a threshold
    in the run's config is predict's default."""
    from finetune_cli.data import synthetic

    run = copy_run(finished_run.run, tmp_path / "run")
    others = tmp_path / "others"
    synthetic.generate(others, "target", per_class=4, size=32, seed=5)
    result = runner.invoke(
        app,
        ["evaluate", str(run), "--unknown", str(others), "--name", "u", "--json"],
    )
    assert result.exit_code == 0, result.output
    u = json.loads(result.output)["unknown"]
    assert u["images"] == 16 and u["coverage"] == 0.95
    result = runner.invoke(
        app,
        [
            "predict",
            str(run),
            str(others),
            "--reject-below",
            repr(u["threshold"]),
            "--out",
            "-",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    rejected = [r for r in rows if r["label"] == "unknown"]
    assert all(r["rejected"] and r["confidence"] < u["threshold"] for r in rejected)
    assert len(rejected) / len(rows) == pytest.approx(u["rejected"])
    # The run's config sets it by default; --reject-below 0 turns it off.
    import yaml

    config = run / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["calibration"]["reject_below"] = 0.999
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["predict", str(run), str(others)])
    assert result.exit_code == 0, result.output
    assert "16 unknown" in result.output
    result = runner.invoke(
        app, ["predict", str(run), str(others), "--reject-below", "0"]
    )
    assert result.exit_code == 0, result.output
    assert ": unknown " not in result.output and " unknown," not in result.output


def test_an_export_carries_the_temperature_and_the_reject_threshold(
    finished_run, tmp_path
):
    import yaml

    run = copy_run(finished_run.run, tmp_path / "run")
    config = run / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["calibration"]["reject_below"] = 0.6
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "export"
    result = runner.invoke(
        app, ["export", str(run), "--format", "keras", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "metadata.json").read_text())
    rec = json.loads((run / "calibration.json").read_text())
    assert meta["calibration"]["temperature"] == rec["temperature"]
    assert meta["unknown"] == {"reject_below": 0.6, "label": "unknown"}
