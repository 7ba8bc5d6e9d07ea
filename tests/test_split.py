"""The recorded split: a run is judged on the files it held out, whatever
happens to the data folder afterwards."""

import csv
import dataclasses
import json
import os
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.data import split as split_lib
from finetune_cli.data import synthetic
from finetune_cli.train import job as trainer
from finetune_cli.cli.main import app
from finetune_cli.console import Output
from finetune_cli.errors import EXIT_DATA

from conftest import tiny_config


def quiet():
    return Output(file=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run on a data folder of its own (the tests
    using it add, change and remove images: not the shared run's)."""
    tmp = tmp_path_factory.mktemp("split")
    data = tmp / "data"
    synthetic.generate(data, "source", per_class=8, size=32, seed=4)
    raw = tiny_config(data, tmp)
    run = trainer.finetune(config_lib.validate(raw), quiet()).run_dir
    return data, run


def predictions(path):
    return sorted(r["file"] for r in csv.DictReader(open(path)))


def evaluate(run, *args):
    return CliRunner().invoke(app, ["evaluate", str(run), "--json", *args])


def test_split_json_lists_every_file_with_label_and_hash(finished_run):
    data, run = finished_run.data, finished_run.run
    rec = json.loads((run / "split.json").read_text())
    files = [f for split in rec["files"].values() for f in split]
    on_disk = sorted(str(p) for p in data.rglob("*.*"))
    assert sorted(f[0] for f in files) == on_disk
    for path, label, digest in files:
        assert os.path.basename(os.path.dirname(path)) == label
        assert digest == split_lib.preflight_lib.sha256_file(path)


def test_a_grown_folder_does_not_change_what_evaluate_scores(trained):
    data, run = trained
    end_of_run = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    before = predictions(run / "eval" / "test" / "predictions.csv")
    # Nightly retraining: new photos arrive in one class. Re-splitting the
    # folder now would move training images into the test split.
    extra = data / "circle"
    for i in range(4):
        img = Image.new("RGB", (32, 32), (i * 40, 10, 10))
        img.save(extra / f"new_{i}.jpg")
    result = evaluate(run, "--out", str(run / "eval" / "later"))
    assert result.exit_code == 0, result.output
    later = json.loads(result.stdout)
    assert later["num_samples"] == end_of_run["num_samples"]
    assert later["summary"] == end_of_run["summary"]
    assert predictions(run / "eval" / "later" / "predictions.csv") == before
    assert not any("new_" in f for f in before)


def test_a_vanished_or_changed_test_image_is_named(trained, tmp_path):
    data, run = trained
    rec = json.loads((run / "split.json").read_text())
    # Two classes, so every class keeps a test image.
    (gone, _, _), (edited, _, _) = rec["files"]["test"][0], rec["files"]["test"][-1]
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(gone, backup / "gone")
    shutil.copy(edited, backup / "edited")
    try:
        os.unlink(gone)
        Image.new("RGB", (32, 32), (1, 2, 3)).save(
            edited, format=Image.open(backup / "edited").format
        )
        result = evaluate(run)
        assert result.exit_code == EXIT_DATA, result.output
        assert gone in result.output and "no longer exists" in result.output
        assert edited in result.output and "content changed" in result.output
        assert "--allow-missing" in result.output
        assert "Traceback" not in result.output
        result = CliRunner().invoke(
            app,
            [
                "evaluate",
                str(run),
                "--json",
                "--allow-missing",
                "--out",
                str(tmp_path / "ev"),
            ],
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["num_samples"] == len(rec["files"]["test"]) - 2
        assert gone in result.stderr and "left out" in result.stderr
    finally:
        shutil.copy(backup / "gone", gone)
        shutil.copy(backup / "edited", edited)


@pytest.mark.heavy
def test_skipped_held_out_duplicate_counts_nowhere(tmp_path):
    """A test image that duplicates a training image is skipped by the
    pre-flight check; the end-of-run metrics must not count it."""
    data = tmp_path / "data"
    synthetic.generate(data / "all", "source", per_class=6, size=32, seed=5)
    for split, take in (
        ("train", slice(0, 4)),
        ("val", slice(4, 5)),
        ("test", slice(5, 6)),
    ):
        for cls in sorted(os.listdir(data / "all")):
            (data / split / cls).mkdir(parents=True)
            for f in sorted(os.listdir(data / "all" / cls))[take]:
                shutil.copy(data / "all" / cls / f, data / split / cls / f)
    shutil.rmtree(data / "all")
    train_img = sorted((data / "train" / "star").iterdir())[0]
    dup = data / "test" / "star" / ("dup" + train_img.suffix)
    shutil.copy(train_img, dup)
    raw = tiny_config(data, tmp_path)
    raw["data"]["on_bad_image"] = "skip"
    run = trainer.finetune(config_lib.validate(raw), quiet()).run_dir
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["num_samples"] == 4  # one per class; the duplicate is out
    assert str(dup) not in predictions(run / "eval" / "test" / "predictions.csv")
    assert str(dup) in (run / "skipped_images.txt").read_text()
    result = json.loads((run / "metrics.json").read_text())
    assert result["test"]["accuracy"] == metrics["summary"]["accuracy"]


def test_an_unchanged_folder_is_not_hashed_again_unless_asked(
    shapes_dir, tmp_path, monkeypatch
):
    """Pre-flight, resume and evaluate trust the verdict cache for files
    whose size and mtime are unchanged: a rerun costs a stat per file."""
    import shutil

    from finetune_cli.data import index as data_lib
    from finetune_cli.data import preflight

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    cache = tmp_path / "preflight.json"
    index = data_lib.index_data(config_lib.Data(dir=str(data)), 0)
    paths = [p for v in index.splits.values() for p, _ in v]
    hashed = []
    real = preflight.sha256_file
    monkeypatch.setattr(
        preflight, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a)
    )
    first, save = preflight.image_verdicts(paths, cache)
    save()
    assert len(hashed) == len(paths)
    hashed.clear()
    again, _ = preflight.image_verdicts(paths, cache)
    assert hashed == [] and again == first
    # A file rewritten (new mtime) is hashed and decoded again; only it.
    changed = paths[0]
    os.utime(changed, ns=(1, 1))
    preflight.image_verdicts(paths, cache)
    assert hashed == [changed]
    hashed.clear()
    preflight.image_verdicts(paths, cache, rehash=True)
    assert sorted(hashed) == sorted(paths)

    # The recorded split of a run: checked by the same cache.
    run = tmp_path / "run"
    run.mkdir()
    (run / split_lib.FILE).write_text(
        json.dumps(
            split_lib.record(
                dataclasses.replace(index, digests={p: v[1] for p, v in first.items()})
            )
        )
    )
    os.utime(changed, ns=(2, 2))  # not in the cache as it is now
    hashed.clear()
    split_lib.load(run, cache_file=cache)
    assert hashed == [changed]
    hashed.clear()
    split_lib.load(run, cache_file=cache, rehash=True)
    assert len(hashed) == len(paths)
    # Content changed with the mtime put back: only a rehash sees it.
    st = os.stat(paths[1])
    raw = bytearray(open(paths[1], "rb").read())
    raw[-1] ^= 0xFF  # the same size
    open(paths[1], "wb").write(bytes(raw))
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    split_lib.load(run, cache_file=cache)  # size and mtime: trusted
    with pytest.raises(Exception, match="content changed"):
        split_lib.load(run, cache_file=cache, rehash=True)
