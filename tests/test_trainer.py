"""The trainer end to end: the run folder, the schedule, bad images."""

import csv
import io
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.train import monitor as monitor_lib
from finetune_cli.data import index as data_lib
from finetune_cli.data import pipeline
from finetune_cli.model import build as model_lib
from finetune_cli.model import saved as runmodel
from finetune_cli.train import job as trainer
from finetune_cli.cli.main import app
from finetune_cli.console import Output

from conftest import make_config
from conftest import lively_weights
from conftest import tiny_config


def test_two_phase_run_end_to_end(finished_run):
    """The schedule switches, epochs continue, the run folder is complete."""
    import keras

    run = finished_run.run
    cfg = config_lib.validate(finished_run.raw)

    # The schedule really switched: phase 2's optimizer and LR.
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    assert [r["phase"] for r in history] == ["head", "head", "top", "top"]
    assert [float(r["lr"]) for r in history] == pytest.approx([1e-2, 1e-2, 3e-4, 3e-4])
    metrics = json.loads((run / "metrics.json").read_text())
    assert [p["optimizer"] for p in metrics["phases"]] == ["Adam", "SGD"]
    # The best epoch: highest val_accuracy, ties to the lowest val_loss.
    ranked = sorted(
        history, key=lambda r: (-float(r["val_accuracy"]), float(r["val_loss"]))
    )
    assert metrics["best_epoch"] == int(ranked[0]["epoch"])
    assert [p["last_epoch"] for p in metrics["phases"]] == [2, 4]
    # The run's test accuracy is the share of rows of the report's
    # predictions.csv whose label is right.
    rows = list(csv.DictReader(open(run / "eval" / "test" / "predictions.csv")))
    right = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
    assert metrics["test"]["accuracy"] == pytest.approx(right, abs=1e-6)

    # Everything the run directory promises is there and loads.
    for name in (
        "config.yaml",
        "labels.txt",
        "history.csv",
        "best.keras",
        "last.keras",
        "metrics.json",
        "environment.json",
        "log.txt",
        "status.json",
        "base.weights.h5",
        "split.json",
    ):
        assert (run / name).is_file(), name
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "labels.txt").read_text().split() == [
        "circle",
        "square",
        "star",
        "triangle",
    ]
    assert config_lib.load_config(run / "config.yaml") == cfg
    env = json.loads((run / "environment.json").read_text())
    assert env["tensorflow"] and env["devices"]
    model = keras.saving.load_model(run / "best.keras", safe_mode=True)
    x = np.stack(
        [
            np.asarray(pipeline.load_image(p, (32, 32)))
            for p in data_lib.index_data(cfg.data, 3).files("val")
        ]
    )
    probs = np.asarray(model.predict(x, verbose=0))
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    # The base weights file fine-tunes onward: it loads into a fresh base.
    again = model_lib.build_base(
        config_lib.Model(
            name="MobileNetV2",
            weights=str(run / "base.weights.h5"),
            options={"alpha": 0.35},
        ),
        (32, 32),
    )
    base = model_lib.build_base(
        config_lib.Model(
            name="MobileNetV2",
            weights=str(finished_run.weights),
            options={"alpha": 0.35},
        ),
        (32, 32),
    )
    assert len(again.weights) == len(base.weights)
    assert (run.parent / "latest").resolve() == run.resolve()
    # experiment.tensorboard: event files for training and validation.
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert {p.parent.name for p in events} >= {"train", "validation"}, events
    # An export of `latest` records the run folder it came from.
    from finetune_cli.deploy import export as export_lib

    target = runmodel.resolve_target(run.parent / "latest")
    meta = export_lib.metadata(target, model, [])
    assert meta["source"]["run"] == str(run.resolve())
    assert meta["source"]["model"] == str((run / "best.keras").resolve())
    text = finished_run.output
    assert "phase head: val_accuracy" in text and "phase top: val_accuracy" in text
    assert "\x1b[" not in text  # plain output when not a terminal


def test_training_data_has_grayscale_rgba_gif_bmp(shapes_dir, tmp_path):
    """The end-to-end run above trains and validates on these files."""
    from PIL import Image

    cfg = make_config(shapes_dir, tmp_path)
    index = data_lib.index_data(cfg.data, 3)
    files = index.files("train") + index.files("val")
    modes = {(Image.open(f).mode, f.rsplit(".", 1)[1]) for f in files}
    assert {("L", "png"), ("RGBA", "png"), ("P", "gif"), ("RGB", "bmp")} <= modes


def test_corrupt_image_is_caught_before_training_or_skipped(tmp_path):
    from finetune_cli.data import synthetic

    data = tmp_path / "data"
    synthetic.generate(data, "source", per_class=4, size=32)
    (data / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    path = tmp_path / "c.yaml"
    raw = tiny_config(data, tmp_path)
    raw["data"]["split"] = {"train": 0.75, "val": 0.25, "test": 0.0}
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["finetune", str(path)])
    assert result.exit_code == 3, result.output
    assert "bad image" in result.output and "broken.jpg" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "t").exists() or not any(
        p.is_dir() for p in (tmp_path / "runs" / "t").iterdir()
    )
    result = CliRunner().invoke(
        app, ["finetune", str(path), "--set", "data.on_bad_image=skip"]
    )
    assert result.exit_code == 0, result.output
    (run,) = [p for p in (tmp_path / "runs" / "t").iterdir() if p.name[0].isdigit()]
    # The pre-flight scan reports its progress; no test split, yet curves.
    assert "pre-flight: 17/17 images" in result.output
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "eval").exists()
    skipped = (run / "skipped_images.txt").read_text()
    assert "broken.jpg" in skipped and "not a readable image" in skipped
    split = json.loads((run / "split.json").read_text())
    assert sum(v["files"] for v in split["splits"].values()) == 16  # 17, 1 skipped
    recorded = [f for files in split["files"].values() for f, _, _ in files]
    assert len(recorded) == 16 and not any("broken" in f for f in recorded)
    assert split["skipped"][0][0].endswith("broken.jpg")


@pytest.mark.heavy
def test_val_loss_monitor_xla_and_no_feature_cache(shapes_dir, tmp_path, monkeypatch):
    import keras

    compiled = []
    fit = keras.Model.fit

    def spy(self, *args, **kwargs):
        compiled.append(self.jit_compile)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    raw = tiny_config(
        shapes_dir,
        tmp_path,
        phases=[{"name": "head", "epochs": 2, "learning_rate": 3e-2}],
    )
    raw["experiment"]["monitor"] = "val_loss"
    raw["runtime"] = {"xla": True}
    raw["feature_cache"]["enabled"] = False
    result = trainer.finetune(config_lib.validate(raw), Output(file=io.StringIO()))
    history = list(csv.DictReader(open(result.run_dir / "history.csv")))
    losses = [float(r["val_loss"]) for r in history]
    # The best epoch is the lowest val_loss (the lower-is-better direction).
    assert result.metrics["best_epoch"] == 1 + losses.index(min(losses))
    assert result.metrics["best_value"] == pytest.approx(min(losses))
    # Trained through the base (no cache written), compiled with XLA.
    assert [p["path"] for p in result.metrics["phases"]] == ["base"]
    assert not (tmp_path / "features").exists()
    assert compiled and all(compiled)
    env = json.loads((result.run_dir / "environment.json").read_text())
    assert env["runtime"]["xla"] is True


def test_out_of_memory_is_a_config_error_naming_the_batch(
    shapes_dir, tmp_path, monkeypatch
):
    import keras
    import tensorflow as tf

    def oom(self, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")

    monkeypatch.setattr(keras.Model, "fit", oom)
    raw = tiny_config(shapes_dir, tmp_path)
    raw["feature_cache"]["enabled"] = False
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["finetune", str(path)])
    assert result.exit_code == 2, result.output
    assert "data.batch_size: out of memory" in result.output
    assert "batch of 8 (32x32 images)" in result.output
    assert "Traceback" not in result.output
    (run,) = [p for p in (tmp_path / "runs" / "t").iterdir() if p.name[0].isdigit()]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["resumable"] is True


def test_best_epoch_ties_go_to_the_better_other_metric():
    rows = [
        {"epoch": 1, "val_accuracy": 0.5, "val_loss": 0.9},
        {"epoch": 2, "val_accuracy": 0.75, "val_loss": 0.7},
        {"epoch": 3, "val_accuracy": 0.75, "val_loss": 0.6},  # tie, lower loss
        {"epoch": 4, "val_accuracy": 0.75, "val_loss": 0.65},  # tie, higher
        {"epoch": 5, "val_accuracy": 0.7, "val_loss": 0.1},
    ]

    def best_of(monitor):
        best = None
        for i, row in enumerate(rows):
            if monitor_lib.improved(monitor, row, rows[: i + 1], best):
                best = row["epoch"]
        return best

    assert best_of("val_accuracy") == 3
    assert best_of("val_loss") == 5
    rows[4]["val_loss"] = 0.6  # ties epoch 3 on loss; epoch 3 is more accurate
    assert best_of("val_loss") == 3
    rows[2]["val_accuracy"] = float("nan")
    assert monitor_lib.improved("val_accuracy", rows[2], rows, 2) is False


@pytest.mark.heavy
def test_test_loss_is_the_last_phase_loss_on_the_report_probabilities(
    shapes_dir, tmp_path, monkeypatch
):
    """metrics.json's test loss is the last phase's loss (its label smoothing
    included) on the probabilities of the test report's one pass."""
    import dataclasses

    from finetune_cli.evaluate import evaluation

    real = evaluation.evaluate
    seen = {}

    def confident(*args, **kwargs):
        # The tiny model's outputs are near-uniform, where every smoothing
        # gives ln 4: put confident rows, some wrong, in the report's place.
        ev = real(*args, **kwargs)
        n = len(ev.labels)
        probs = np.full((n, 4), 0.1 / 3, "float32")
        guess = [(y + (i % 3 == 0)) % 4 for i, y in enumerate(ev.labels)]
        probs[np.arange(n), guess] = 0.9
        seen["probs"], seen["labels"] = probs, np.asarray(ev.labels)
        return dataclasses.replace(ev, probs=probs)

    monkeypatch.setattr(evaluation, "evaluate", confident)
    raw = tiny_config(
        shapes_dir,
        tmp_path,
        phases=[
            {"name": "head", "epochs": 1},
            {"name": "again", "epochs": 1, "label_smoothing": 0.2},
        ],
    )
    result = trainer.finetune(config_lib.validate(raw), Output(file=io.StringIO()))

    def cross_entropy(smoothing):
        y = np.eye(4)[seen["labels"]] * (1 - smoothing) + smoothing / 4
        return float(np.mean(-(y * np.log(seen["probs"])).sum(1)))

    loss = result.metrics["test"]["loss"]
    assert loss == pytest.approx(cross_entropy(0.2), rel=1e-5)
    assert abs(loss - cross_entropy(0.0)) > 0.05


def test_the_epoch_table_shows_the_rate_an_epoch_started_at(shapes_dir, tmp_path):
    # A one-epoch cosine phase ends at a rate of 0: the row shows the rate
    # it trained with, the history the one after it (what Keras reports).
    raw = tiny_config(
        shapes_dir,
        tmp_path,
        phases=[
            {"name": "head", "epochs": 1, "learning_rate": 2e-3, "schedule": "cosine"}
        ],
    )
    buf = io.StringIO()
    result = trainer.finetune(config_lib.validate(raw), Output(file=buf))
    lines = buf.getvalue().splitlines()
    header = next(i for i, x in enumerate(lines) if x.split()[:1] == ["epoch"])
    assert lines[header].split() == ["epoch", "acc", "loss", "val_acc", "val_loss"] + [
        "lr",
        "time",
    ]
    row = lines[header + 1].split()
    assert row[0] == "1" and row[-2] == "2e-3"
    assert all(len(x) <= 80 for x in lines[header : header + 2])
    history = list(csv.DictReader(open(result.run_dir / "history.csv")))
    assert float(history[0]["lr"]) == pytest.approx(0.0, abs=1e-9)
    assert "(best epoch 1, 1 epoch)" in buf.getvalue()  # not "1 epochs"


def test_an_interrupted_run_says_so_in_its_log(shapes_dir, tmp_path, monkeypatch):
    import keras

    def ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "fit", ctrl_c)
    raw = tiny_config(shapes_dir, tmp_path)
    raw["feature_cache"]["enabled"] = False
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["finetune", str(path)])
    assert result.exit_code == 5, result.output
    (run,) = (tmp_path / "runs" / "t").glob("2*")
    log = (run / "log.txt").read_text()
    assert "interrupted: stopped by Ctrl-C or SIGTERM after epoch 0" in log
    assert f"--resume {run}" in log


@pytest.mark.heavy
def test_ema_validates_and_keeps_the_moving_average_of_the_weights(
    shapes_dir, tmp_path
):
    """optimizer.use_ema: the epochs are scored on the weights' moving
    average, and best.keras holds that average (not the last step's
    weights), so it scores on the validation images what the history says."""
    import keras

    from finetune_cli.data import split as split_lib

    def run(name, optimizer):
        raw = tiny_config(
            shapes_dir,
            tmp_path / name,
            phases=[
                {
                    "name": "head",
                    "epochs": 3,
                    "learning_rate": 3e-2,
                    "optimizer": optimizer,
                }
            ],
        )
        raw["experiment"]["monitor"] = "val_loss"
        raw["model"]["weights"] = lively_weights(tmp_path / "lively.weights.h5")
        # Uncalibrated: best.keras is then exactly the best epoch's weights.
        raw["calibration"] = "none"
        return trainer.finetune(config_lib.validate(raw), Output(file=io.StringIO()))

    ema = run("ema", {"name": "adam", "use_ema": True, "ema_momentum": 0.9})
    plain = run("plain", "adam")
    history = list(csv.DictReader(open(ema.run_dir / "history.csv")))
    best = history[ema.metrics["best_epoch"] - 1]
    index = split_lib.load(ema.run_dir)
    x, y = [], []
    for images, onehot in pipeline.make_dataset(index.splits["val"], 4, (32, 32), 8):
        x.append(np.asarray(images))
        y.append(np.argmax(np.asarray(onehot), axis=1))
    x, y = np.concatenate(x), np.concatenate(y)
    model = keras.saving.load_model(ema.run_dir / "best.keras")
    probs = model.predict(x, verbose=0)
    loss = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)))
    assert loss == pytest.approx(float(best["val_loss"]), abs=2e-3)
    # The average is not the trained weights: the scores differ from a run
    # without EMA (same seed, data and schedule).
    plain_history = list(csv.DictReader(open(plain.run_dir / "history.csv")))
    assert [r["val_loss"] for r in history] != [r["val_loss"] for r in plain_history]
    # ... while training itself went the same way (the average is only read).
    assert [float(r["loss"]) for r in history] == pytest.approx(
        [float(r["loss"]) for r in plain_history], rel=1e-5
    )


# A whole run and its resume (or two runs): `make test-heavy` (CI).
@pytest.mark.heavy
def test_mixing_reaches_every_path_a_phase_trains_on(shapes_dir, tmp_path, monkeypatch):
    """MixUp mixes the cached augmented views of a head phase and the cached
    activations of a top phase; CutMix, under feature_cache.augmented:
    faithful, mixes the images of a phase on the base."""
    mixed = []
    apply = pipeline.Mixer.apply

    def spy(self, ds, epoch_and_batch):
        mixed.append(len(ds.element_spec[0].shape))
        return apply(self, ds, epoch_and_batch)

    monkeypatch.setattr(pipeline.Mixer, "apply", spy)
    phases = [
        {"name": "head", "epochs": 1},
        {"name": "top", "epochs": 1, "trainable": {"from_layer": "block_16_expand"}},
    ]
    aug = [{"type": "flip"}, {"type": "randaugment"}, {"type": "mixup"}]
    raw = tiny_config(shapes_dir, tmp_path / "a", phases=phases, augmentation=aug)
    result = trainer.finetune(config_lib.validate(raw), Output(file=io.StringIO()))
    assert [p["path"] for p in result.metrics["phases"]] == ["views", "activations"]
    assert mixed == [2, 2]  # pooled features, then flattened activations
    mixed.clear()
    raw = tiny_config(
        shapes_dir,
        tmp_path / "b",
        phases=phases[:1],
        augmentation=[{"type": "cutmix"}],
    )
    raw["feature_cache"]["augmented"] = "faithful"
    result = trainer.finetune(config_lib.validate(raw), Output(file=io.StringIO()))
    assert [p["path"] for p in result.metrics["phases"]] == ["base"]
    assert mixed == [4]  # images


# Two whole runs compared: `make test-heavy` (CI).
@pytest.mark.heavy
def test_a_phase_trains_at_its_own_image_size_and_the_model_keeps_data_size(
    shapes_dir, tmp_path
):
    """phases[].image_size: a head phase at 48 px trains on features of
    48 px images and gives the head the weights that a run at 48 px gives
    it; the saved model still takes data.image_size (32 px)."""
    import keras

    weights = lively_weights(tmp_path / "lively.weights.h5")

    def run(name, data_size, phase_size):
        phase = {"name": "head", "epochs": 2, "learning_rate": 3e-2}
        if phase_size:
            phase["image_size"] = phase_size
        raw = tiny_config(shapes_dir, tmp_path / name, phases=[phase])
        raw["data"]["image_size"] = data_size
        raw["model"]["weights"] = weights
        raw["experiment"]["deterministic"] = True
        result = trainer.finetune(config_lib.validate(raw), Output(file=io.StringIO()))
        model = keras.saving.load_model(result.run_dir / "best.keras")
        head = [w.numpy() for w in model.get_layer("predictions").weights]
        return result, model, head

    at_48, model_48, head_48 = run("at-48", 48, None)
    phase_48, model_32, head_32 = run("phase-48", 32, 48)
    assert model_32.input_shape == (None, 32, 32, 3)
    assert model_48.input_shape == (None, 48, 48, 3)
    assert phase_48.metrics["phases"][0]["path"] == "features"
    for a, b in zip(head_48, head_32, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [r["val_loss"] for r in phase_48.history] == pytest.approx(
        [r["val_loss"] for r in at_48.history], rel=1e-5
    )
    # The features it trained on are of 48 px images.
    manifests = (tmp_path / "phase-48" / "features").rglob("manifest.json")
    sizes = {
        tuple(json.loads(m.read_text())["key_fields"]["image_size"]) for m in manifests
    }
    assert sizes == {(48, 48)}


def test_a_phase_size_below_the_model_minimum_is_named():
    raw = {
        "data": {"dir": "x", "image_size": 64},
        "model": {"name": "MobileNetV2", "weights": "none"},
        "phases": [{"name": "a", "epochs": 1, "image_size": 16}],
    }
    with pytest.raises(Exception, match=r"phases\.0\.image_size.*at least 32x32"):
        config_lib.validate(raw)
