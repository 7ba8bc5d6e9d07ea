"""Folders on object storage through tf.io.gfile, tested on ram:// (a file
system TensorFlow registers in-process): the mirror's push and pull, a
weights file and a CSV fetched, and a whole run written, stopped, resumed,
evaluated and exported there."""

import json
import os
import shutil

import pytest
import tensorflow as tf

from finetune_cli import remote


@pytest.fixture(autouse=True)
def mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CLI_MIRROR", str(tmp_path / "mirror"))
    return tmp_path / "mirror"


def read(path):
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def test_push_sends_what_changed_and_pull_brings_it_back(tmp_path):
    local = tmp_path / "run"
    (local / "eval" / "test").mkdir(parents=True)
    (local / "best.keras").write_bytes(b"A" * 100)
    (local / "eval" / "test" / "report.html").write_text("<html>")
    (local / "resume.npz").write_bytes(b"state")
    (local / ".lock").write_text("hidden: not sent")
    os.symlink("eval", local / "latest")
    dest = "ram://push-test/runs/x/1"
    assert remote.push(local, dest) == 3  # the link is a pointer, not a file
    assert read(dest + "/best.keras") == b"A" * 100
    assert read(dest + "/eval/test/report.html") == b"<html>"
    assert read(dest + "/latest.txt") == b"eval\n"  # a link: a text pointer
    assert not tf.io.gfile.exists(dest + "/.lock")
    assert not tf.io.gfile.glob(dest + "/*.partial")
    assert remote.push(local, dest) == 0  # nothing changed
    # The same size, new content: sent again (the mtime says so).
    (local / "best.keras").write_bytes(b"B" * 100)
    os.utime(local / "best.keras", ns=(1, 1))
    assert remote.push(local, dest) == 1
    assert read(dest + "/best.keras") == b"B" * 100

    back = remote.pull(dest, tmp_path / "back")
    assert (back / "best.keras").read_bytes() == b"B" * 100
    assert (back / "eval" / "test" / "report.html").read_text() == "<html>"
    with pytest.raises(Exception, match="no such folder"):
        remote.pull("ram://push-test/none", tmp_path / "none")


def test_a_weights_file_and_a_csv_are_fetched(tmp_path, shapes_dir):
    src = "ram://fetch-test/w/base.weights.h5"
    tf.io.gfile.makedirs("ram://fetch-test/w")
    with tf.io.gfile.GFile(src, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\nrest")
    local = remote.fetch(src)
    assert open(local, "rb").read().startswith(b"\x89HDF")
    assert remote.fetch(str(tmp_path)) == str(tmp_path)  # local: itself

    folder = "ram://fetch-test/data"
    rows = ["path,label"]
    for p in sorted(shapes_dir.rglob("*.*"))[:6]:
        rel = f"{p.parent.name}/{p.name}"
        tf.io.gfile.makedirs(f"{folder}/{p.parent.name}")
        tf.io.gfile.copy(str(p), f"{folder}/{rel}", overwrite=True)
        rows.append(f"{rel},{p.parent.name}")
    with tf.io.gfile.GFile(folder + "/labels.csv", "w") as f:
        f.write("\n".join(rows) + "\n")
    local_csv = remote.pull_csv(folder + "/labels.csv")
    base = os.path.dirname(local_csv)
    for row in rows[1:]:
        rel = row.split(",")[0]
        assert read(f"{folder}/{rel}") == open(os.path.join(base, rel), "rb").read()


@pytest.mark.heavy
def test_a_run_on_object_storage_stops_resumes_and_is_evaluated_there(
    tmp_path, shapes_dir, mirror, monkeypatch
):
    import yaml
    from typer.testing import CliRunner

    from finetune_cli import faults
    from finetune_cli.cli.main import app
    from finetune_cli.errors import EXIT_TIME_LIMIT

    from conftest import lively_weights
    from conftest import tiny_config

    bucket = "ram://run-test"
    runner = CliRunner()
    r = runner.invoke(
        app,
        ["pack", str(shapes_dir), "--out", f"{bucket}/shards", "--val", "0.25"]
        + ["--test", "0.25", "--shard-size", "4"],
    )
    assert r.exit_code == 0, r.output
    tf.io.gfile.copy(
        lively_weights(tmp_path / "lively.weights.h5"),
        f"{bucket}/lively.weights.h5",
    )
    raw = tiny_config(shapes_dir, tmp_path)
    raw["experiment"].update(output_dir=f"{bucket}/runs", time_limit="150s")
    raw["data"] = {"records": f"{bucket}/shards", "image_size": 32, "batch_size": 8}
    raw["model"]["weights"] = f"{bucket}/lively.weights.h5"
    raw["feature_cache"] = {"dir": f"{bucket}/features"}
    raw["phases"] = [
        {"name": "head", "epochs": 2, "learning_rate": 1e-2},
        {"name": "top", "epochs": 2, "trainable": {"top": 6}, "learning_rate": 1e-3},
    ]
    cfg = tmp_path / "remote.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("FINETUNE_CLI_CLOCK_STEP", "60")
    monkeypatch.setattr(faults, "_ticks", [0])
    r = runner.invoke(app, ["finetune", str(cfg), "--plain"])
    assert r.exit_code == EXIT_TIME_LIMIT, r.output
    (stamp,) = tf.io.gfile.listdir(f"{bucket}/runs/t")
    run = f"{bucket}/runs/t/{stamp.rstrip('/')}"
    status = json.loads(read(run + "/status.json"))
    assert status["state"] == "interrupted" and status["resumable"]
    assert tf.io.gfile.exists(run + "/resume.npz")
    saved = yaml.safe_load(read(run + "/config.yaml"))
    assert saved["experiment"]["output_dir"] == f"{bucket}/runs"

    # The feature cache went to the bucket at the command's end.
    assert tf.io.gfile.glob(f"{bucket}/features/t/*")
    shutil.rmtree(mirror)  # another machine: only the bucket has the run
    faults._ticks[0] = 0
    r = runner.invoke(
        app, ["finetune", "--resume", run, "--time-limit", "1d", "--plain"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(read(run + "/status.json"))["state"] == "completed"
    assert tf.io.gfile.exists(run + "/eval/test/report.html")
    assert read(f"{bucket}/runs/t/latest.txt").decode().strip() == stamp.rstrip("/")
    rows = read(run + "/history.csv").decode().strip().splitlines()
    assert len(rows) == 5  # four epochs over the two sessions

    shutil.rmtree(mirror)
    r = runner.invoke(
        app, ["evaluate", f"{bucket}/runs/t/latest", "--name", "again", "--plain"]
    )
    import traceback

    assert r.exit_code == 0, "".join(traceback.format_exception(*r.exc_info))
    assert tf.io.gfile.exists(run + "/eval/again/metrics.json")
    r = runner.invoke(
        app,
        ["export", run, "--format", "keras", "--out", f"{bucket}/export", "--plain"],
    )
    assert r.exit_code == 0, r.output
    meta = json.loads(read(f"{bucket}/export/metadata.json"))
    assert meta["class_names"] == ["circle", "square", "star", "triangle"]
    assert tf.io.gfile.exists(f"{bucket}/export/model.keras")
    # Promotion to object storage: versions, then the pointer as the switch.
    r = runner.invoke(app, ["promote", run, "--to", f"{bucket}/prod", "--plain"])
    assert r.exit_code == 0, r.output
    target = read(f"{bucket}/prod.txt").decode().strip()
    assert target.startswith("prod.versions/")
    assert tf.io.gfile.exists(f"{bucket}/{target}/model.keras")
    assert json.loads(read(run + "/promotion.json"))["promoted"] is True
    shutil.rmtree(mirror)
    image = str(next(shapes_dir.rglob("*.png")))
    r = runner.invoke(app, ["predict", f"{bucket}/prod/model.keras", image])
    assert r.exit_code == 0 and "predicted 1 of 1" in r.output, r.output
