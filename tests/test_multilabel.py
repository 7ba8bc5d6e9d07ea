"""Multi-label data (`task: multi_label`): label cells, the stratified
split, the config's rules, the recorded split and the targets."""

import numpy as np
import yaml
import pytest
from PIL import Image

from finetune_cli import config as config_lib
from finetune_cli.data import index as data_lib
from finetune_cli.data import multilabel
from finetune_cli.data import split as split_lib
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError

from conftest import tiny_config


def write_csv(folder, rows, name="labels.csv", header="path,label"):
    """Images for every row's path (a 4x4 of a distinct colour) and the CSV."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i, row in enumerate(rows):
        path = folder / "img" / f"{i:04d}.png"
        Image.new("RGB", (4, 4), (i % 256, i // 256, 7)).save(path)
        lines.append(",".join([f"img/{path.name}", *row]))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def ml_config(csv, tmp_path, **data):
    raw = tiny_config(csv.parent, tmp_path, task="multi_label")
    raw["data"].pop("dir")
    raw["data"].update(csv=str(csv), **data)
    return config_lib.validate(raw)


def test_a_label_cell_is_a_set_split_on_the_separator():
    assert multilabel.parse_cell(" cat | dog|cat||", "|") == ("cat", "dog")
    assert multilabel.parse_cell("", "|") == ()
    assert multilabel.parse_cell("a b", " ") == ("a", "b")
    rows = multilabel.targets([(0, 2), (), 1], 3)
    assert rows.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]


def test_the_stratified_split_puts_every_label_in_every_split(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        labels = [c for c in ("a", "b", "c") if rng.random() < 0.5]
        if i < 3:  # a rare label with exactly one image per split's worth
            labels.append("rare")
        rows.append(["|".join(labels)])
    csv = write_csv(tmp_path, rows)
    cfg = ml_config(csv, tmp_path)
    index = data_lib.index_config(cfg)
    assert index.multi_label and index.class_names == ["a", "b", "c", "rare"]
    for split in ("train", "val", "test"):
        counts = index.counts(split)
        assert all(c > 0 for c in counts), (split, counts)
    # Shares close to the fractions, for the images and for each label.
    n = {s: len(v) for s, v in index.splits.items()}
    assert n["train"] == pytest.approx(60, abs=4) and n["val"] == pytest.approx(
        30, abs=4
    )
    a = [index.counts(s)[0] for s in ("train", "val", "test")]
    assert a[0] / sum(a) == pytest.approx(0.5, abs=0.08)
    # Every image once; the same seed gives the same split, another another.
    files = sorted(p for v in index.splits.values() for p, _ in v)
    assert len(files) == len(set(files)) == 120
    assert data_lib.index_config(cfg).splits == index.splits
    other = config_lib.validate(
        {**cfg.model_dump(mode="json"), "experiment": {"seed": 9}}
    )
    assert data_lib.index_config(other).splits != index.splits


def test_a_label_with_too_few_images_is_named(tmp_path):
    rows = [["a|b"]] * 20 + [["lonely"], ["lonely|a"]]
    cfg = ml_config(write_csv(tmp_path, rows), tmp_path)
    with pytest.raises(DataError, match=r"label 'lonely' has 2 image\(s\).*at least 3"):
        data_lib.index_config(cfg)


def test_empty_cells_are_images_without_labels_and_the_separator_is_a_key(tmp_path):
    rows = [["a;b"], [""], ["b"], ["a"]] * 6
    cfg = ml_config(write_csv(tmp_path, rows), tmp_path, label_separator=";")
    index = data_lib.index_config(cfg)
    labels = [lb for v in index.splits.values() for _, lb in v]
    assert labels.count(()) == 6 and labels.count((0, 1)) == 6
    assert index.label_name((0, 1)) == "a|b"


def test_a_split_column_is_used_and_a_label_only_in_val_is_named(tmp_path):
    rows = [["a|b", "train"], ["a", "train"], ["b", "val"], ["a|c", "val"]]
    csv = write_csv(tmp_path, rows, header="path,label,split")
    with pytest.raises(DataError, match=r"line 5: labels \['c'\] appear in val"):
        data_lib.index_config(ml_config(csv, tmp_path))
    rows[3] = ["a|b", "val"]
    csv = write_csv(tmp_path, rows, header="path,label,split")
    index = data_lib.index_config(ml_config(csv, tmp_path))
    assert index.splits["train"][0][1] == (0, 1) and len(index.splits["val"]) == 2


def test_labels_that_differ_only_in_case_are_a_typo(tmp_path):
    csv = write_csv(tmp_path, [["Cat|dog"], ["cat"], ["dog"]] * 3)
    with pytest.raises(DataError, match="differs from 'Cat'.*only in case"):
        data_lib.index_config(ml_config(csv, tmp_path))


def test_the_config_rules_of_the_task(tmp_path, shapes_dir):
    csv = write_csv(tmp_path, [["a|b"], ["a"], ["b"]] * 4)
    assert ml_config(csv, tmp_path).experiment.monitor == "val_map"
    raw = tiny_config(shapes_dir, tmp_path, task="multi_label")
    with pytest.raises(ConfigError, match="data.dir.*multi_label reads its labels"):
        config_lib.validate(raw)
    raw = tiny_config(shapes_dir, tmp_path)
    raw["experiment"]["monitor"] = "val_map"
    with pytest.raises(ConfigError, match="experiment.monitor.*multi_label only"):
        config_lib.validate(raw)
    raw = tiny_config(csv.parent, tmp_path, task="multi_label")
    raw["data"] = {"csv": str(csv)}
    raw["experiment"]["monitor"] = "val_accuracy"
    with pytest.raises(ConfigError, match="val_accuracy is single-label's"):
        config_lib.validate(raw)
    raw["task"] = "multilabel"
    with pytest.raises(ConfigError, match="task"):
        config_lib.validate(raw)


def test_the_split_record_keeps_label_sets(tmp_path):
    csv = write_csv(tmp_path, [["a|b"], [""], ["b"], ["a"]] * 5)
    index = data_lib.index_config(ml_config(csv, tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    import json

    rec = split_lib.record(index)
    assert rec["task"] == "multi_label"
    assert sorted(map(tuple, (r[1] for r in rec["files"]["train"]))) >= [()]
    (run / split_lib.FILE).write_text(json.dumps(rec))
    loaded = split_lib.load(run)
    assert loaded.multi_label and loaded.splits == index.splits
    rec["files"]["val"][0][1] = ["a", "zebra"]
    (run / split_lib.FILE).write_text(json.dumps(rec))
    with pytest.raises(Exception, match="malformed entry"):
        split_lib.load(run)


@pytest.mark.heavy
def test_a_multi_label_run_from_csv_to_export(tmp_path):
    """finetune -> thresholds and per-label calibration in the run ->
    evaluate (metrics, gate on map) -> predict label sets that equal the
    report's -> export with the thresholds, parity checked on label sets."""
    import csv as csv_lib
    import json

    from typer.testing import CliRunner

    from finetune_cli.cli.main import app
    from finetune_cli.data import synthetic
    from finetune_cli.errors import EXIT_GATE

    from conftest import lively_weights

    data = tmp_path / "shapes"
    synthetic.generate_multi_label(data, images=160, size=32, seed=2)
    raw = tiny_config(data, tmp_path, task="multi_label")
    raw["data"] = {
        "csv": str(data / "labels.csv"),
        "image_size": 32,
        "batch_size": 16,
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
    }
    raw["model"]["weights"] = lively_weights(tmp_path / "lively.weights.h5")
    raw["phases"] = [
        {"name": "head", "epochs": 8, "learning_rate": 0.01, "class_weight": "auto"}
    ]
    cfg = tmp_path / "ml.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", str(cfg), "--quiet"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "t" / "latest"
    th = json.loads((run / "thresholds.json").read_text())["labels"]
    assert sorted(th) == ["circle", "square", "star", "triangle"]
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["per_label"] and sorted(cal["temperatures"]) == sorted(th)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"] == "val_map"
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert test["task"] == "multi_label"
    assert {"map", "micro_f1", "macro_f1", "subset_accuracy"} <= set(test["summary"])
    # The weighted binary cross-entropy trains the head: the loss falls.
    history = list(csv_lib.DictReader(open(run / "history.csv")))
    assert float(history[-1]["loss"]) < float(history[0]["loss"]) - 0.01
    assert "val_map" in history[0]

    r = runner.invoke(app, ["evaluate", str(run), "--fail-under", "map=1.01"])
    assert r.exit_code == EXIT_GATE, r.output
    assert "map" in r.output and "threshold" in r.output

    report = {
        row["file"]: row["predicted"]
        for row in csv_lib.DictReader(open(run / "eval" / "test" / "predictions.csv"))
    }
    out = tmp_path / "pred.json"
    r = runner.invoke(app, ["predict", str(run), *report, "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert {row["file"]: row["label"] for row in rows} == report
    assert all(
        row["labels"] == sorted(row["labels"], key=row["labels"].index) for row in rows
    )

    r = runner.invoke(
        app,
        ["export", str(run), "--format", "keras,tflite", "--out", str(tmp_path / "ex")],
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "ex" / "metadata.json").read_text())
    assert meta["task"] == "multi_label"
    assert meta["thresholds"] == {k: v["threshold"] for k, v in th.items()}
    rep = json.loads((tmp_path / "ex" / "export_report.json").read_text())
    assert rep["compared_on"] == "label sets" and rep["passed"]
    # The exported model predicts the same label sets, at the same thresholds.
    r = runner.invoke(
        app,
        ["predict", str(tmp_path / "ex" / "model.keras"), *report, "--out", str(out)],
    )
    assert {row["file"]: row["label"] for row in json.loads(out.read_text())} == report
