"""Sharded records (`pack`, `data.records`): what is written, how it is
read (per epoch, per worker), and what a run on shards records."""

import json
import os

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.cli.main import app
from finetune_cli.console import Output
from finetune_cli.data import index as data_lib
from finetune_cli.data import pipeline
from finetune_cli.data import records
from finetune_cli.data.pack import pack_data
from finetune_cli.errors import EXIT_DATA

from conftest import tiny_config


def quiet():
    return Output(file=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def shards(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "shards"
    section = config_lib.Data(
        dir=str(shapes_dir), split={"train": 0.5, "val": 0.25, "test": 0.25}
    )
    pack_data(section, out, seed=3, multi_label=False, shard_size=4, out=quiet())
    return out


def test_a_pack_holds_every_image_once_with_its_label_and_hash(shards, shapes_dir):
    manifest, digest = records.read_manifest(shards)
    assert manifest["format"] == records.FORMAT
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {
        "train": 16,
        "val": 8,
        "test": 8,
    }
    assert [s["file"] for s in manifest["shards"]][:2] == [
        "train-00000.tfrecord",
        "train-00001.tfrecord",
    ]
    import hashlib

    import tensorflow as tf

    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.VarLenFeature(tf.int64),
        "sha256": tf.io.FixedLenFeature([], tf.string),
        "path": tf.io.FixedLenFeature([], tf.string),
    }
    seen = {}
    for s in manifest["shards"]:
        path = shards / s["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        for r in tf.data.TFRecordDataset(str(path)):
            ex = tf.io.parse_single_example(r, spec)
            raw = ex["image"].numpy()
            src = ex["path"].numpy().decode()
            assert raw == open(src, "rb").read()  # the file's bytes, as they were
            assert ex["sha256"].numpy().decode() == hashlib.sha256(raw).hexdigest()
            label = int(tf.sparse.to_dense(ex["labels"])[0])
            assert manifest["classes"][label] == os.path.basename(os.path.dirname(src))
            seen[src] = s["split"]
    assert sorted(seen) == sorted(str(p) for p in shapes_dir.rglob("*.*"))
    # A shard mixes classes (packed in a shuffled order).
    idx = records.index_records(shards)
    first = [lb for k, lb in idx.splits["train"] if "train-00000" in k]
    assert len(set(first)) > 1


def test_every_worker_reads_its_own_shards_and_all_are_read(shards):
    idx = records.index_records(shards)
    train = idx.splits["train"]

    def labels_of(ds):
        return [tuple(np.argmax(y, 1)) for _, y in ds.as_numpy_iterator()]

    def rows(shard):
        ds = pipeline.make_dataset(
            train, 4, (32, 32), 1, shuffle=True, seed=5, epochs=(0, 1), shard=shard
        )
        return [x.tobytes() for x, _ in ds.as_numpy_iterator()]

    a, b, whole = rows((0, 2)), rows((1, 2)), rows((0, 1))
    assert len(a) == len(b) == 8 and not set(a) & set(b)
    assert sorted(a + b) == sorted(whole)
    # The same (seed, epoch) gives the same order; another epoch another.
    again = pipeline.make_dataset(
        train, 4, (32, 32), 4, shuffle=True, seed=5, epochs=(0, 2)
    )
    once = pipeline.make_dataset(
        train, 4, (32, 32), 4, shuffle=True, seed=5, epochs=(1, 2)
    )
    both = labels_of(again)
    assert both[4:] == labels_of(once) and both[:4] != both[4:]
    # In order, for extraction and evaluation: the keys' order.
    ordered = pipeline.make_dataset(idx.splits["val"], 4, (32, 32), 8)
    got = [int(i) for _, y in ordered.as_numpy_iterator() for i in np.argmax(y, 1)]
    assert got == [lb for _, lb in idx.splits["val"]]


def test_a_config_on_records_and_its_errors(shards, tmp_path, shapes_dir):
    raw = tiny_config(shapes_dir, tmp_path)
    raw["data"] = {"records": str(shards), "image_size": 32, "batch_size": 8}
    cfg = config_lib.validate(raw)
    idx = data_lib.index_config(cfg)
    assert idx.records["manifest_sha256"] == records.read_manifest(shards)[1]
    raw["data"]["fraction"] = 0.5
    with pytest.raises(Exception, match="fraction"):
        config_lib.validate(raw)
    raw["data"] = {"records": str(shards), "dir": str(shapes_dir)}
    with pytest.raises(Exception, match="exactly one of"):
        config_lib.validate(raw)
    raw["data"] = {"records": str(tmp_path)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["config", "validate", str(path)])
    assert r.exit_code == EXIT_DATA and "no manifest.json" in r.output
    raw["task"] = "multi_label"
    raw["data"] = {"records": str(shards)}
    with pytest.raises(Exception, match="packed as single_label"):
        data_lib.index_config(config_lib.validate(raw))


def test_pack_refuses_an_existing_folder_and_names_a_bad_image(shapes_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(app, ["pack", str(data), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "already exists" in r.output
    bad = data / "circle" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    r = CliRunner().invoke(app, ["pack", str(data), "--out", str(tmp_path / "s")])
    assert r.exit_code == EXIT_DATA and "broken.jpg" in r.output
    assert not (tmp_path / "s").exists()  # nothing half-written
    r = CliRunner().invoke(
        app, ["pack", str(data), "--out", str(tmp_path / "s"), "--skip-bad"]
    )
    assert r.exit_code == 0, r.output
    manifest, _ = records.read_manifest(tmp_path / "s")
    assert [p for p, _ in manifest["skipped"]] == [str(bad)]


def test_a_pack_on_a_filesystem_tensorflow_registers(shapes_dir):
    """ram:// is in-process: the code paths that differ from a local disk
    (tf.io.gfile writes and renames, TFRecord reads) run here."""
    section = config_lib.Data(
        dir=str(shapes_dir), split={"train": 0.5, "val": 0.25, "test": 0.25}
    )
    out = "ram://finetune-test/shards"
    manifest = pack_data(
        section, out, seed=3, multi_label=False, shard_size=8, out=quiet()
    )
    idx = records.index_records(out)
    assert idx.splits["train"].shards[0].startswith("ram://finetune-test/shards/")
    assert len(idx.splits["train"]) == manifest["splits"]["train"]["images"] == 16
    ds = pipeline.make_dataset(idx.splits["val"], 4, (32, 32), 8)
    assert sum(len(y) for _, y in ds.as_numpy_iterator()) == 8
    assert records.check_shards(out, manifest, rehash=True) == []


@pytest.mark.heavy
def test_a_run_on_shards_resumes_after_a_kill_and_is_judged_on_its_manifest(
    shards, shapes_dir, tmp_path
):
    import shutil

    import cli_process

    from conftest import lively_weights

    own = tmp_path / "shards"
    shutil.copytree(shards, own)
    raw = tiny_config(shapes_dir, tmp_path)
    raw["data"] = {"records": str(own), "image_size": 32, "batch_size": 8}
    raw["model"]["weights"] = lively_weights(tmp_path / "lively.weights.h5")
    raw["phases"] = [
        {"name": "head", "epochs": 2, "learning_rate": 1e-2},
        {"name": "all", "epochs": 2, "trainable": "all", "learning_rate": 1e-3},
    ]
    cfg = tmp_path / "rec.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    killed = cli_process.run(["finetune", str(cfg), "--plain"], fault="epoch_saved@3")
    assert killed.returncode == -9
    (run,) = [p for p in (tmp_path / "runs" / "t").iterdir() if p.name[0].isdigit()]
    rec = json.loads((run / "split.json").read_text())
    assert rec["files"] == {} and rec["records"]["folder"] == str(own)
    assert rec["records"]["manifest_sha256"] == records.read_manifest(own)[1]
    done = cli_process.run(["finetune", "--resume", str(run), "--plain"])
    assert done.returncode == 0, done.stderr[-3000:]
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert test["num_samples"] == 8

    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", str(run), "--json", "--name", "again"])
    assert r.exit_code == 0, r.output
    # A shard cut short: named, not scored.
    shard = own / "test-00000.tfrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    r = runner.invoke(app, ["evaluate", str(run)])
    assert r.exit_code == EXIT_DATA and "test-00000.tfrecord: size changed" in r.output
    shard.write_bytes(data)
    # Packed again (another split): the run's manifest no longer matches.
    shutil.rmtree(own)
    section = config_lib.Data(dir=str(shapes_dir))
    pack_data(section, own, seed=9, multi_label=False, shard_size=4, out=quiet())
    r = runner.invoke(app, ["evaluate", str(run)])
    assert r.exit_code == EXIT_DATA and "manifest.json changed" in r.output


def test_predict_reads_a_pack_given_as_its_folder(shards, tmp_path, shapes_dir):
    from conftest import constant_model

    model = constant_model(tmp_path, "const", 2, shapes_dir)
    out = tmp_path / "preds.json"
    r = CliRunner().invoke(app, ["predict", str(model), str(shards), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    keys = [k for v in records.index_records(shards).splits.values() for k, _ in v]
    assert [row["file"] for row in rows] == keys  # every record, in order
    assert {row["label"] for row in rows} == {"star"} and len(rows) == 32


def test_a_multi_label_csv_packs_into_label_sets(tmp_path):
    from test_multilabel import write_csv

    csv = write_csv(tmp_path, [["a|b"], [""], ["b"], ["a"]] * 5)
    section = config_lib.Data(csv=str(csv))
    out = tmp_path / "shards"
    manifest = pack_data(
        section, out, seed=1, multi_label=True, shard_size=8, out=quiet()
    )
    assert manifest["task"] == "multi_label"
    idx = records.index_records(out, multi_label=True)
    from_csv = data_lib.index_data(section, 1, multi_label=True)
    assert sorted(lb for v in idx.splits.values() for _, lb in v) == sorted(
        lb for v in from_csv.splits.values() for _, lb in v
    )
    ds = pipeline.make_dataset(idx.splits["train"], 2, (4, 4), 64)
    rows = np.concatenate([y for _, y in ds.as_numpy_iterator()])
    want = [[1.0 * (0 in lb), 1.0 * (1 in lb)] for _, lb in idx.splits["train"]]
    assert rows.tolist() == want  # multi-hot, empty sets as zeros
