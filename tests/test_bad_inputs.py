"""Bad input, table-driven: each case exits with its documented code, names
the culprit, prints no traceback, and (for finetune) starts no training."""

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli.cli import app
from finetune_cli.errors import EXIT_CONFIG
from finetune_cli.errors import EXIT_DATA

from conftest import tiny_config

runner = CliRunner()


def cfg_change(fn):
    def setup(tmp_path, data):
        raw = tiny_config(data, tmp_path)
        fn(raw, tmp_path, data)
        return raw
    return setup


def data_change(fn):
    def setup(tmp_path, data):
        fn(tmp_path, data)
        return tiny_config(data, tmp_path)
    return setup


def _csv(tmp_path, data, rows, header="path,label"):
    path = data / "m.csv"
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return str(path)


CASES = [
    # ---- config ----
    ("unknown top-level key", EXIT_CONFIG, "modle",
     cfg_change(lambda r, t, d: r.update(modle={}))),
    ("typo in phase key", EXIT_CONFIG, "lerning_rate",
     cfg_change(lambda r, t, d: r["phases"][0].update(lerning_rate=1e-3))),
    ("learning rate not a number", EXIT_CONFIG, "phases.0.learning_rate",
     cfg_change(lambda r, t, d: r["phases"][0].update(learning_rate="fast"))),
    ("negative learning rate", EXIT_CONFIG, "phases.0.learning_rate",
     cfg_change(lambda r, t, d: r["phases"][0].update(learning_rate=-1e-3))),
    ("unknown application", EXIT_CONFIG, "model.name",
     cfg_change(lambda r, t, d: r["model"].update(name="ResNet51"))),
    ("image smaller than minimum", EXIT_CONFIG, "data.image_size",
     cfg_change(lambda r, t, d: r["data"].update(image_size=8))),
    ("no phases", EXIT_CONFIG, "phases",
     cfg_change(lambda r, t, d: r.update(phases=[]))),
    ("unknown optimizer", EXIT_CONFIG, "phases.0.optimizer.name",
     cfg_change(lambda r, t, d: r["phases"][0].update(optimizer="adamx"))),
    ("missing weights file", EXIT_CONFIG, "model.weights",
     cfg_change(lambda r, t, d: r["model"].update(weights=str(t / "no.h5")))),
    ("weights file of another architecture", EXIT_CONFIG, "model.weights",
     cfg_change(lambda r, t, d: (
         r["model"].update(weights=str(t / "w.h5")),
         (t / "w.h5").write_bytes(b"not an hdf5 file")))),
    ("layer name that does not exist", EXIT_CONFIG,
     "phases.0.trainable.from_layer",
     cfg_change(lambda r, t, d: r["phases"][0].update(
         trainable={"from_layer": "block_99"}))),
    ("unknown class in class_weight", EXIT_CONFIG, "phases.0.class_weight",
     cfg_change(lambda r, t, d: r["phases"][0].update(
         class_weight={"circel": 2.0}))),
    ("both dir and csv", EXIT_CONFIG, "data",
     cfg_change(lambda r, t, d: r["data"].update(csv="x.csv"))),
    ("bad split fractions", EXIT_CONFIG, "data.split",
     cfg_change(lambda r, t, d: r["data"].update(
         split={"train": 0.9, "val": 0.3, "test": 0.0}))),
    ("duplicate YAML key", EXIT_CONFIG, "duplicate key 'data'",
     lambda t, d: "data: {dir: a}\ndata: {dir: b}\nphases: []\n"),
    ("YAML syntax error", EXIT_CONFIG, "invalid YAML",
     lambda t, d: "data: {dir: [unclosed\n"),
    # ---- data ----
    ("data folder missing", EXIT_DATA, "data.dir: folder not found",
     cfg_change(lambda r, t, d: r["data"].update(dir=str(t / "nowhere")))),
    ("zero-byte image", EXIT_DATA, "empty.jpg: empty file",
     data_change(lambda t, d: (d / "circle" / "empty.jpg").write_bytes(b""))),
    ("truncated image", EXIT_DATA, "cut.png",
     data_change(lambda t, d: (d / "circle" / "cut.png").write_bytes(
         (d / "circle" / "circle_0001.png").read_bytes()[:200]))),
    ("text file in a class folder", EXIT_DATA, "notes.txt",
     data_change(lambda t, d: (d / "star" / "notes.txt").write_text("hi"))),
    ("non-image with an image name", EXIT_DATA, "fake.jpg",
     data_change(lambda t, d: (d / "star" / "fake.jpg").write_text("<html>"))),
    ("empty class folder", EXIT_DATA, "class 'hexagon' has no images",
     data_change(lambda t, d: (d / "hexagon").mkdir())),
    ("class with one image", EXIT_DATA, "class 'single' has 1 image",
     data_change(lambda t, d: ((d / "single").mkdir(), shutil.copy(
         d / "circle" / "circle_0000.jpg", d / "single" / "a.jpg")))),
    ("same image in two splits", EXIT_DATA, "the same image is in two splits",
     data_change(lambda t, d: [shutil.copy(d / "circle" / "circle_0000.jpg",
                                           d / "circle" / f"copy{i}.jpg")
                               for i in range(3)])),
    ("CSV row with a missing file", EXIT_DATA, "line 3: file not found: gone.jpg",
     cfg_change(lambda r, t, d: (r["data"].pop("dir"), r["data"].update(
         csv=_csv(t, d, ["circle/circle_0000.jpg,circle", "gone.jpg,circle"]))))),
    ("CSV path escaping the dataset root", EXIT_DATA, "points outside",
     cfg_change(lambda r, t, d: (r["data"].pop("dir"), r["data"].update(
         csv=_csv(t, d, ["../../etc/passwd,circle"]))))),
    ("CSV without a label column", EXIT_DATA, "needs a header with `path` and `label`",
     cfg_change(lambda r, t, d: (r["data"].pop("dir"), r["data"].update(
         csv=_csv(t, d, ["circle/circle_0000.jpg"], header="path"))))),
]


@pytest.mark.parametrize("name, code, culprit, setup", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, shapes_dir, name, code, culprit, setup):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    made = setup(tmp_path, data)
    path = tmp_path / "c.yaml"
    path.write_text(made if isinstance(made, str) else yaml.safe_dump(made))
    result = runner.invoke(app, ["finetune", str(path)])
    assert result.exit_code == code, result.output
    assert culprit in result.output, result.output
    assert "Traceback" not in result.output
    # Caught before training: no run folder holds any epoch.
    runs = tmp_path / "runs"
    assert not list(runs.rglob("history.csv")) if runs.exists() else True


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
