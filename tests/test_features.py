"""extract and the feature cache: exact, keyed on content, grafted back."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.data import index as data_lib
from finetune_cli.data import pipeline
from finetune_cli.cache import features
from finetune_cli.cache import extract as extract_lib
from finetune_cli.cache import store
from finetune_cli.model import build as model_lib
from finetune_cli.cache import heads as feature_training
from finetune_cli.train import job as trainer
from finetune_cli.cli.main import app
from finetune_cli.console import Output

from conftest import lively_weights
from conftest import tiny_config

runner = CliRunner()


def quiet():
    return Output(file=open(os.devnull, "w"))


@pytest.fixture
def setup(shapes_dir, tmp_path):
    """A config with a weights file the test wrote, and a copy of the data."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    weights = tmp_path / "pre.weights.h5"
    lively_weights(weights)
    raw = tiny_config(data, tmp_path)
    raw["model"]["weights"] = str(weights)
    return raw, data, weights


def extract_split(raw, split="train", out=None):
    cfg = config_lib.validate(raw)
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    extractor = features.build_extractor(cfg)
    folder = out or extract_lib.cache_root(cfg) / split
    return features.get_features(cfg, extractor, index, split, folder, quiet())


def test_features_are_bit_identical_across_runs(setup, tmp_path):
    raw, _, _ = setup
    a, ra = extract_split(raw, out=tmp_path / "a")
    b, rb = extract_split(raw, out=tmp_path / "b")
    assert not ra.reused and not rb.reused
    fa, la, pa = a.load()
    fb, lb, pb = b.load()
    assert fa.shape == (1, 16, 1280) and np.abs(fa).max() > 0
    np.testing.assert_array_equal(fa, fb)
    assert pa == pb and list(la) == list(lb)
    again, r = extract_split(raw, out=tmp_path / "a")
    assert r.reused


def test_shards_are_plain_numpy_with_a_manifest(setup, tmp_path):
    raw, _, _ = setup
    raw["feature_cache"]["shard_size"] = 5
    fs, _ = extract_split(raw, out=tmp_path / "f")
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["format"] == "finetune-cli-features/1"
    # Whole batches (8) go to a shard until it holds >= 5 rows: 2 shards.
    assert len(manifest["shards"]) == 2
    # Readable with NumPy alone, without our package.
    code = (
        "import json, numpy as np, sys; d = sys.argv[1]; "
        "m = json.load(open(d + '/manifest.json')); "
        "z = [np.load(d + '/' + s) for s in m['shards']]; "
        "f = np.concatenate([s['features'] for s in z]); "
        "assert f.shape == (m['num_images'], m['feature_dim']), f.shape; "
        "assert 'finetune_cli' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], check=True)


def test_changes_invalidate_the_cache_and_say_why(setup, tmp_path):
    raw, data, weights = setup
    folder = tmp_path / "c"
    extract_split(raw, out=folder)
    cfg = config_lib.validate(raw)
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)

    def why(raw_changed):
        c = config_lib.validate(raw_changed)
        i = data_lib.index_data(c.data, c.experiment.seed)
        fields = store.key_fields(c, i.splits["train"])
        return store.open_cache(folder, fields)[1]

    assert why(raw) is None
    bigger = json.loads(json.dumps(raw))
    bigger["data"]["image_size"] = 48
    assert "image_size changed ([32, 32] -> [48, 48])" in why(bigger)
    # Another weights file (same architecture, different values).
    other = model_lib.build_base(cfg.model, (32, 32))
    other.layers[-3].set_weights([w * 2 for w in other.layers[-3].get_weights()])
    other_path = tmp_path / "other.weights.h5"
    other.save_weights(str(other_path))
    changed = json.loads(json.dumps(raw))
    changed["model"]["weights"] = str(other_path)
    assert "weights changed (sha256:" in why(changed)
    # One image edited in place.
    victim = index.files("train")[0]
    with open(victim, "ab") as f:
        f.write(b"\0")
    reason = why(raw)
    assert f"1 image(s) modified: {os.path.basename(victim)}" in reason
    # And extract recomputes, saying so.
    from io import StringIO

    buf = StringIO()
    c = config_lib.validate(raw)
    fs, r = features.get_features(
        c, features.build_extractor(c), index, "train", folder, Output(file=buf)
    )
    assert not r.reused and "cache out of date: 1 image(s) modified" in buf.getvalue()


# Two phases trained and compared with the full model: `make test-heavy` (CI).
@pytest.mark.heavy
def test_head_from_cache_grafts_exactly_and_next_phase_trains(setup, tmp_path):
    raw, _, _ = setup
    raw["phases"] = [
        {"name": "head", "epochs": 1, "learning_rate": 1e-2},
        {"name": "top", "epochs": 1, "trainable": {"top": 6}, "learning_rate": 1e-3},
    ]
    # The top phase runs the base here (test_activations covers the cache).
    raw["feature_cache"]["activations"] = False
    cfg = config_lib.validate(raw)
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    # Extract first, as a user would; finetune must reuse it.
    extract_lib.extract_command(cfg, quiet(), "all")
    buf = __import__("io").StringIO()
    result = trainer.finetune(cfg, Output(file=buf))
    text = buf.getvalue()
    assert "features [train]: reusing" in text
    assert "phase 1/2: head (cached features)" in text
    assert "phase 2/2: top (base every epoch)" in text
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert [p["path"] for p in metrics["phases"]] == ["features", "base"]

    # The graft is exact: the full model on validation images equals the head
    # on their cached features. Checked on the head phase's model, rebuilt
    # from last.keras of a head-only run.
    import keras

    raw_head = json.loads(json.dumps(raw))
    raw_head["phases"] = raw_head["phases"][:1]
    raw_head["experiment"]["name"] = "headonly"
    cfg_head = config_lib.validate(raw_head)
    run = trainer.finetune(cfg_head, quiet()).run_dir
    model = keras.saving.load_model(run / "best.keras", safe_mode=True)
    base = model_lib.find_base(model)
    val_fs, _ = features.get_features(
        cfg_head,
        features.build_extractor(cfg_head),
        index,
        "val",
        extract_lib.cache_root(cfg_head) / "val",
        quiet(),
    )
    vf, _, paths = val_fs.load()
    assert paths == index.files("val")
    head = feature_training.head_model(model, base)
    from_features = head.predict(vf[0], verbose=0)
    x = np.stack([np.asarray(pipeline.load_image(p, (32, 32))) for p in paths])
    from_images = model.predict(x, verbose=0)
    np.testing.assert_allclose(from_images, from_features, atol=1e-5, rtol=1e-4)

    # The following phase trained from the grafted model: the final base's
    # top layers moved away from the pretrained weights.
    final = keras.saving.load_model(result.run_dir / "last.keras", safe_mode=True)
    pre = model_lib.build_base(cfg.model, (32, 32))
    moved = [
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(
            pre.layers[-4].weights,
            model_lib.find_base(final).layers[-4].weights,
            strict=True,
        )
    ]
    assert any(moved)


# Views of a cache built and rebuilt: `make test-heavy` (CI).
@pytest.mark.heavy
def test_augmented_views_are_cached_per_view(setup, tmp_path):
    raw, _, _ = setup
    raw["augmentation"] = [{"type": "flip"}, {"type": "rotation", "factor": 0.2}]
    raw["feature_cache"].update(augmented="views", views=3)
    raw["phases"] = [{"name": "head", "epochs": 3, "learning_rate": 1e-2}]
    cfg = config_lib.validate(raw)
    buf = __import__("io").StringIO()
    trainer.finetune(cfg, Output(file=buf))
    assert "cached features, 3 augmented views" in buf.getvalue()
    fs = store.FeatureSet(
        extract_lib.cache_root(cfg) / "train-3views",
        json.loads(
            (extract_lib.cache_root(cfg) / "train-3views" / "manifest.json").read_text()
        ),
    )
    f, _, _ = fs.load()
    assert f.shape[:2] == (3, 16)
    assert not np.array_equal(f[0], f[1]) and not np.array_equal(f[1], f[2])
    # faithful (the default) runs the base every epoch instead.
    raw["feature_cache"]["augmented"] = "faithful"
    raw["experiment"]["name"] = "faithful"
    raw["phases"][0]["epochs"] = 1  # the plan is what is checked
    buf = __import__("io").StringIO()
    trainer.finetune(config_lib.validate(raw), Output(file=buf))
    assert "phase 1/1: head (base every epoch)" in buf.getvalue()


def test_a_view_is_augmented_in_the_pipeline_as_if_alone(shapes_dir):
    """View v's batch b is augmented with randomness from (seed, v, b) only:
    inside the input pipeline (overlapping the model) it equals the layers
    called eagerly on that batch after a reset, whatever ran before."""
    cfg = config_lib.validate(
        {
            **tiny_config(shapes_dir, shapes_dir),
            "augmentation": [
                {"type": "flip"},
                {"type": "rotation", "factor": 0.2},
                {"type": "zoom", "factor": 0.2},
            ],
        }
    )
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    samples = index.splits["train"]
    augmenter = pipeline.build_augmenter(cfg.augmentation, 5)

    def view(v, batch=4):
        return [
            np.asarray(x)
            for x, _ in pipeline.make_dataset(
                samples,
                batch,
                (32, 32),
                4,
                seed=5,
                augmenter=augmenter,
                deterministic=True,
                view=v,
            )
        ]

    second = view(1)  # before view 0: order must not matter
    first = view(0)
    # The pipeline augments float pixels and rounds the batch to uint8 last.
    plain = pipeline.make_dataset(samples, 4, (32, 32), 4, pixels="float32")
    for b, (x, _) in enumerate(plain):
        pipeline.reseed(augmenter, 5, 0, b)
        expected = pipeline.to_uint8(augmenter(x, training=True))
        np.testing.assert_array_equal(first[b], expected)
        pipeline.reseed(augmenter, 5, 1, b)
        expected = pipeline.to_uint8(augmenter(x, training=True))
        np.testing.assert_array_equal(second[b], expected)
    assert not np.array_equal(first[0], second[0])
    # The randomness is per batch, so the batch size decides what a view
    # holds, and a cache of views made at another batch size is stale.
    assert not np.array_equal(view(0, batch=2)[0], first[0][:2])

    def key(c, views):
        return store.key_fields(c, samples, views=views, augmentation=c.augmentation)

    other = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"batch_size": 2})}
    )
    why = store.explain_mismatch(key(cfg, 2), key(other, 2))
    assert why == "augment_batch_size changed (8 -> 2)"
    assert key(cfg, 1) == key(other, 1)  # unaugmented features do not care


def test_cli_extract(setup, tmp_path):
    raw, _, _ = setup
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "feats"
    result = runner.invoke(
        app, ["extract", str(path), "--split", "val", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "val" / "manifest.json").is_file()
    assert "images/s" in result.output
    result = runner.invoke(app, ["extract", str(path), "--split", "nope"])
    assert result.exit_code == 2 and "--split" in result.output


@pytest.mark.heavy
def test_extract_then_finetune_reuse_one_cache_with_skipped_images(setup, tmp_path):
    # A held-out duplicate of a training image and an unreadable file:
    # `extract` and `finetune` must leave out the same images, or their
    # splits (and so their caches) differ.
    import shutil

    raw, data, _ = setup
    star = sorted((data / "star").iterdir())
    shutil.copy(star[0], data / "star" / ("zz-copy" + star[0].suffix))
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    raw["data"]["on_bad_image"] = "skip"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["extract", str(path), "--plain"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "features" / "t"
    manifests = {s: (root / s / "manifest.json").read_bytes() for s in ("train", "val")}
    result = runner.invoke(app, ["finetune", str(path), "--plain"])
    assert result.exit_code == 0, result.output
    assert "features [train]: reusing" in result.output
    assert "features [val]: reusing" in result.output
    assert "recomputing" not in result.output
    for s, before in manifests.items():
        assert (root / s / "manifest.json").read_bytes() == before, s
    skipped = (tmp_path / "runs" / "t" / "latest" / "skipped_images.txt").read_text()
    assert "broken.png" in skipped


def test_alternating_two_configs_keeps_both_entries_within_the_size_bound(
    shapes_dir, tmp_path
):
    """A new user alternating a 32 px and a 48 px config: each computes its
    features once; the cache folder keeps both until `max_size` says no."""

    def run(size, **cache):
        raw = tiny_config(shapes_dir, tmp_path)
        raw["data"]["image_size"] = size
        raw["feature_cache"].update(cache)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        store.USED.clear()  # each command is a process of its own
        result = CliRunner().invoke(
            app, ["extract", str(tmp_path / "c.yaml"), "--plain"]
        )
        assert result.exit_code == 0, result.output
        return result.output

    assert "computed" in run(32) and "computed" in run(48)
    for size in (32, 48, 32):
        out = run(size)
        assert "computed" not in out and "reusing" in out, out
    entries = sorted(
        p.parent.name for p in (tmp_path / "features").rglob("manifest.json")
    )
    assert len(entries) == 6  # train, val, test at each size

    # A bound that fits one size's entries: the least recently used go
    # (32 px, used last, is kept while in use; 48 px, used now, stays).
    one = sum(
        f.stat().st_size
        for f in (tmp_path / "features" / "t").rglob("*")
        if f.is_file() and "." not in f.parent.name
    )
    out = run(48, max_size=one + 100)
    assert "removed the least recently used entry" in out, out
    left = list((tmp_path / "features").rglob("manifest.json"))
    assert len(left) == 3 and "computed" not in out  # 48 px reused, 32 px gone
