"""evaluate / predict: metrics agree with scikit-learn, files are real,
gates exit with their own code."""

import csv
import html.parser
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.data import index as data_lib
from finetune_cli.data import pipeline

from finetune_cli.cli.main import app
from finetune_cli.errors import EXIT_GATE

from conftest import constant_model
from conftest import copy_run

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(finished_run, tmp_path_factory):
    """A copy of the shared finished run (evaluate writes into it)."""
    return copy_run(finished_run.run, tmp_path_factory.mktemp("evalrun") / "run")


def test_run_evaluation_matches_independent_computation(run_dir, shapes_dir):
    sk = pytest.importorskip("sklearn.metrics")
    import keras

    out = run_dir / "eval" / "test"
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = config_lib.load_config(run_dir / "config.yaml")
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    model = keras.saving.load_model(run_dir / "best.keras", safe_mode=True)
    x = np.stack(
        [np.asarray(pipeline.load_image(f, (32, 32))) for f in index.files("test")]
    )
    probs = model.predict(x, verbose=0)
    y = np.array(index.labels("test"))
    pred = probs.argmax(1)
    assert metrics["num_samples"] == len(y) == 8
    assert metrics["summary"]["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    np.testing.assert_array_equal(
        metrics["confusion_matrix"], sk.confusion_matrix(y, pred, labels=range(4))
    )
    f1 = sk.f1_score(y, pred, average=None, labels=range(4), zero_division=0)
    assert [metrics["per_class"][c]["f1"] for c in metrics["classes"]] == pytest.approx(
        f1
    )
    assert metrics["summary"]["log_loss"] == pytest.approx(
        sk.log_loss(y, _normalised(probs), labels=range(4)), rel=1e-5
    )
    # The run's test loss and accuracy (from the report's one pass) are
    # what Keras' own model.evaluate gives, through the training pipeline,
    # with the loss of the run's last phase.
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    model.compile(
        loss=keras.losses.CategoricalCrossentropy(
            label_smoothing=cfg.phases[-1].label_smoothing
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    ds = pipeline.make_dataset(index.splits["test"], 4, (32, 32), 4)
    keras_test = model.evaluate(ds, verbose=0, return_dict=True)
    assert run_metrics["test"]["accuracy"] == pytest.approx(keras_test["accuracy"])
    assert run_metrics["test"]["accuracy"] == metrics["summary"]["accuracy"]
    assert run_metrics["test"]["loss"] == pytest.approx(keras_test["loss"], rel=1e-5)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["file"] for r in rows] == index.files("test")
    assert [r["predicted"] for r in rows] == [metrics["classes"][i] for i in pred]
    per_class = list(csv.DictReader(open(out / "per_class.csv")))
    assert [r["class"] for r in per_class] == metrics["classes"]


def _normalised(probs):
    # float32 softmax rows sum to 1 within ~1e-7; sklearn warns beyond 1e-8.
    p = probs.astype("float64")
    return p / p.sum(axis=1, keepdims=True)


def test_pngs_are_real_images_and_report_has_every_section(run_dir):
    out = run_dir / "eval" / "test"
    for name in ("confusion_matrix.png", "curves.png"):
        with Image.open(out / name) as im:
            # A drawn figure, not an empty canvas: many colours in use.
            assert im.format == "PNG", name
            assert len(im.convert("RGB").getcolors(1 << 20)) > 50, name

    class Sections(html.parser.HTMLParser):
        ids, images = set(), []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "id" in attrs:
                self.ids.add(attrs["id"])
            if tag == "img":
                self.images.append(attrs["src"])

    parser = Sections()
    parser.feed((out / "report.html").read_text())
    assert {
        "summary",
        "per-class",
        "confusion",
        "most-confused",
        "curves",
        "mistakes",
        "gradcam",
    } <= parser.ids
    # Self-contained: every picture is inline and decodes.
    import base64
    import io

    assert parser.images and all(s.startswith("data:image/") for s in parser.images)
    for src in parser.images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


def test_report_explains_the_worst_mistakes_and_a_few_correct_per_class(run_dir):
    out = run_dir / "eval" / "test"
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    wrong = sorted(
        (r for r in rows if r["true"] != r["predicted"]),
        key=lambda r: -float(r["confidence"]),
    )
    right = [r for r in rows if r["true"] == r["predicted"]]
    expected = [("mistake", r["file"]) for r in wrong[:12]]
    for c in (run_dir / "labels.txt").read_text().split():
        mine = sorted(
            (r for r in right if r["true"] == c), key=lambda r: -float(r["confidence"])
        )
        expected += [("correct", r["file"]) for r in mine[:2]]
    assert expected
    names = sorted(p.name for p in (out / "gradcam").iterdir())
    assert names == [
        f"{i:03d}-{kind}-{Path(f).stem}.png" for i, (kind, f) in enumerate(expected)
    ]
    for name in names:
        with Image.open(out / "gradcam" / name) as im:
            assert im.format == "PNG" and len(im.convert("RGB").getcolors(1 << 20)) > 50
    # Re-evaluating into the same folder (named: without a name a new one is
    # taken) leaves no overlay of the last one.
    stale = out / "gradcam" / "999-mistake-gone.png"
    stale.write_bytes(b"")
    result = runner.invoke(app, ["evaluate", str(run_dir), "--name", "test", "--plain"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "gradcam").iterdir()) == names


def test_cli_json_and_gates(run_dir):
    metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    acc = metrics["summary"]["accuracy"]
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(run_dir),
            "--json",
            "--name",
            "j",
            "--fail-under",
            f"accuracy={acc}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["accuracy"] == pytest.approx(acc)

    threshold = round(acc + 0.01, 4)
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(run_dir),
            "--name",
            "g",
            "--fail-under",
            f"accuracy={threshold}",
        ],
    )
    assert result.exit_code == EXIT_GATE
    assert f"accuracy {acc:.4f} < {threshold:g}" in result.output
    assert "short by 0.0100" in result.output
    gates = json.loads((run_dir / "eval" / "g" / "gates.json").read_text())
    assert gates["passed"] is False

    ll = metrics["summary"]["log_loss"]
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(run_dir),
            "--name",
            "g2",
            "--fail-over",
            f"log_loss={ll / 2:.4f}",
        ],
    )
    assert result.exit_code == EXIT_GATE and "log_loss" in result.output
    result = runner.invoke(
        app, ["evaluate", str(run_dir), "--fail-under", "log_loss=0.5"]
    )
    assert result.exit_code == 2 and "use --fail-over" in result.output
    result = runner.invoke(
        app, ["evaluate", str(run_dir), "--fail-under", "acuracy=0.5"]
    )
    assert result.exit_code == 2 and "did you mean 'accuracy'" in result.output


@pytest.mark.heavy
def test_compare_to_fails_when_worse_on_same_data(tmp_path, shapes_dir):
    # Unbalanced held-out folder: 1 circle, 3 of each other class.
    data = tmp_path / "holdout"
    for cls in ("circle", "square", "star", "triangle"):
        (data / cls).mkdir(parents=True)
        files = sorted((shapes_dir / cls).iterdir())[: 1 if cls == "circle" else 3]
        for f in files:
            (data / cls / f.name).write_bytes(f.read_bytes())
    good = constant_model(tmp_path, "good", 1, shapes_dir)  # square: 3/10
    bad = constant_model(tmp_path, "bad", 0, shapes_dir)  # circle: 1/10
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(bad),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "e1"),
            "--compare-to",
            str(good),
        ],
    )
    assert result.exit_code == EXIT_GATE, result.output
    assert "accuracy 0.1000 is worse than the reference's 0.3000" in result.output
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(good),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "e2"),
            "--compare-to",
            str(bad),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(bad),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "e3"),
            "--compare-to",
            str(good),
            "--tolerance",
            "0.25",
        ],
    )
    assert result.exit_code == 0, result.output


def test_compare_to_leaves_out_what_the_reference_trained_on(run_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir, other, symlinks=True)
    rec = json.loads((other / "split.json").read_text())
    test_files = rec["files"]["test"]
    # The reference run trained on one of this run's test images.
    rec["files"]["train"].append(test_files[0])
    (other / "split.json").write_text(json.dumps(rec))
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(run_dir),
            "--out",
            str(tmp_path / "ev"),
            "--compare-to",
            str(other),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    gates = json.loads((tmp_path / "ev" / "gates.json").read_text())
    assert gates["compare_to"]["images"] == len(test_files) - 1
    assert gates["compare_to"]["left_out_seen_by_reference"] == 1
    # Same model on the same images: equal.
    assert gates["compare_to"]["value"] == gates["compare_to"]["new_value"]


def test_class_mismatch_is_a_clear_error(tmp_path, shapes_dir):
    model = constant_model(tmp_path, "m", 0, shapes_dir)
    data = tmp_path / "other"
    for cls in ("circle", "square", "hexagon"):
        (data / cls).mkdir(parents=True)
        src = next((shapes_dir / "circle").glob("*.jpg"))
        (data / cls / "a.jpg").write_bytes(src.read_bytes())
    result = runner.invoke(app, ["evaluate", str(model), "--data", str(data)])
    assert result.exit_code == 3
    assert "does not know: ['hexagon']" in result.output
    assert "no images in the data: ['star', 'triangle']" in result.output
    assert "Traceback" not in result.output


def test_evaluate_split_config_and_compare_metric(run_dir, tmp_path):
    recorded = json.loads((run_dir / "split.json").read_text())["files"]
    # --split val: the run's recorded validation files.
    result = runner.invoke(
        app, ["evaluate", str(run_dir), "--split", "val", "--name", "v", "--json"]
    )
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["split"] == "val" and m["num_samples"] == len(recorded["val"])
    # --config: the data and split of that config, with --set applied (here
    # half the images held out as test, where the run held out a quarter).
    config = tmp_path / "c.yaml"
    config.write_text((run_dir / "config.yaml").read_text())
    result = runner.invoke(
        app,
        ["evaluate", str(run_dir), "--config", str(config), "--name", "c", "--json"]
        + ["--set", "data.split={train: 0.25, val: 0.25, test: 0.5}"],
    )
    assert result.exit_code == 0, result.output
    assert len(recorded["test"]) == 8
    assert json.loads(result.stdout)["num_samples"] == 16
    # --compare-metric names what --compare-to compares.
    result = runner.invoke(
        app,
        ["evaluate", str(run_dir), "--name", "cm", "--compare-to", str(run_dir)]
        + ["--compare-metric", "macro_f1", "--tolerance", "0"],
    )
    assert result.exit_code == 0, result.output
    gates = json.loads((run_dir / "eval" / "cm" / "gates.json").read_text())
    assert gates["compare_to"]["metric"] == "macro_f1"
    result = runner.invoke(
        app, ["evaluate", str(run_dir), "--compare-metric", "f1_macro"]
    )
    assert result.exit_code == 2 and "macro_f1" in result.output


@pytest.mark.heavy
def test_evaluate_without_a_name_never_replaces_an_earlier_report(
    finished_run, tmp_path
):
    from typer.testing import CliRunner

    from finetune_cli.cli.main import app

    run = copy_run(finished_run.run, tmp_path / "run")
    own = (run / "eval" / "test" / "metrics.json").read_bytes()
    runner = CliRunner()
    for expected in ("test-2", "test-3"):
        result = runner.invoke(app, ["evaluate", str(run)])
        assert result.exit_code == 0, result.output
        assert f"eval/{expected}/report.html" in result.output
        assert (run / "eval" / expected / "metrics.json").is_file()
    assert (run / "eval" / "test" / "metrics.json").read_bytes() == own
    # A name is explicit: that folder is replaced.
    for _ in range(2):
        result = runner.invoke(app, ["evaluate", str(run), "--name", "nightly"])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "nightly",
        "test",
        "test-2",
        "test-3",
    ]
