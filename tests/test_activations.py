"""The activation cache: the cut is exact, training on cached activations
trains what the full model trains, and the cache is read from disk."""

import io
import json
import os
import shutil
import warnings

import numpy as np
import pytest

from conftest import lively_base
from conftest import tiny_config
from finetune_cli.cache import activations
from finetune_cli.cache import cut as cut_lib
from finetune_cli import config as config_lib
from finetune_cli.data import index as data_lib
from finetune_cli.model import build as model_lib
from finetune_cli.train import phases as phases_lib
from finetune_cli.train import summary as summary_lib
from finetune_cli.train import job as trainer
from finetune_cli.console import Output


def quiet():
    return Output(file=open(os.devnull, "w"))


@pytest.mark.parametrize("top", [8, 17, 30])
def test_the_cut_is_exact_wherever_it_falls(top):
    # Some of these cuts fall inside a residual block: two tensors cross.
    base = lively_base()
    names = [la.name for la in model_lib.base_layers(base)][-top:]
    cut, why = cut_lib.find_cut(base, names)
    assert cut is not None, why
    x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype("float32")
    whole = base.predict(x, verbose=0)
    parts = cut.bottom.predict(x, verbose=0)
    parts = parts if isinstance(parts, list) else [parts]
    assert [p.shape[1:] for p in parts] == cut.shapes
    np.testing.assert_allclose(cut.top.predict(parts, verbose=0), whole, atol=1e-5)
    rows = np.concatenate([p.reshape(3, -1) for p in parts], axis=1)
    np.testing.assert_allclose(
        cut.top(cut.split(rows)).numpy(), whole, atol=1e-5, err_msg="split"
    )
    # The top shares the base's layers: its weights are the base's.
    base_weights = {id(w) for w in base.weights}
    assert all(id(w) in base_weights for w in cut.top.weights)
    assert len(cut.names) == len({*cut.names})


def test_a_residual_crossing_the_cut_is_carried():
    base = lively_base()
    layers = [la.name for la in model_lib.base_layers(base)]
    # Just after an add's first input: the skip tensor crosses too.
    at = next(
        i
        for i, n in enumerate(layers)
        if n.endswith("_project_BN") and n.replace("project_BN", "add") in layers
    )
    cut, _ = cut_lib.find_cut(base, layers[at:])
    assert len(cut.names) == 2


def test_random_layers_below_the_cut_are_refused():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    base = keras.Model(inputs, x)
    cut, why = cut_lib.find_cut(base, ["c2"])
    assert cut is None and "drop" in why
    assert cut_lib.find_cut(base, ["c1", "drop", "c2"]) == (
        None,
        "nothing is frozen below the trainable layers",
    )


PHASES = [
    {
        "name": "top",
        "epochs": 2,
        "trainable": {"top": 12},
        "optimizer": {"name": "sgd", "momentum": 0.9},
        "learning_rate": 5e-2,
    }
]


def _run(shapes_dir, tmp_path, name, weights, **fc):
    raw = tiny_config(shapes_dir, tmp_path, phases=PHASES)
    raw["experiment"]["name"] = name
    raw["model"]["weights"] = str(weights)
    raw["feature_cache"].update(fc)
    cfg = config_lib.validate(raw)
    return trainer.finetune(cfg, quiet()).run_dir


@pytest.mark.heavy
def test_training_on_cached_activations_trains_what_the_full_model_trains(
    shapes_dir, tmp_path
):
    import keras

    weights = tmp_path / "pre.weights.h5"
    lively_base().save_weights(str(weights))
    full = _run(shapes_dir, tmp_path, "full", weights, activations=False)
    cached = _run(shapes_dir, tmp_path, "cached", weights, activation_dtype="float32")
    log = (cached / "log.txt").read_text()
    assert "cached activations at" in log
    assert "base every epoch" in (full / "log.txt").read_text()
    a = keras.saving.load_model(full / "last.keras", safe_mode=True)
    b = keras.saving.load_model(cached / "last.keras", safe_mode=True)
    start = keras.models.clone_model(a)
    start_base = model_lib.find_base(start)
    start_base.load_weights(str(weights))
    base_a = model_lib.find_base(a)
    trained = set(
        phases_lib.plan_phases(
            a,
            base_a,
            config_lib.validate(tiny_config(shapes_dir, tmp_path, phases=PHASES)),
        )[0].layer_names
    )
    moved = 0
    for la, lb, ls in zip(
        model_lib.base_layers(base_a),
        model_lib.base_layers(model_lib.find_base(b)),
        model_lib.base_layers(start_base),
        strict=True,
    ):
        for wa, wb, ws in zip(la.weights, lb.weights, ls.weights, strict=True):
            wa, wb, ws = (np.asarray(w) for w in (wa, wb, ws))
            if la.name in trained and not isinstance(
                la, keras.layers.BatchNormalization
            ):
                np.testing.assert_allclose(
                    wb, wa, rtol=1e-3, atol=1e-5, err_msg=la.name
                )
                moved += not np.array_equal(wa, ws)
            else:  # frozen: untouched by either path, bit for bit
                np.testing.assert_array_equal(wa, ws, err_msg=la.name)
                np.testing.assert_array_equal(wb, ws, err_msg=la.name)
    assert moved > 0
    # Same history, epoch for epoch.
    import csv

    rows_a = list(csv.DictReader(open(full / "history.csv")))
    rows_b = list(csv.DictReader(open(cached / "history.csv")))
    for key in ("loss", "val_loss"):
        assert [float(r[key]) for r in rows_b] == pytest.approx(
            [float(r[key]) for r in rows_a], rel=1e-3
        ), key
    # The run's model (the full one) predicts what the phase's top + head did.
    cfg = config_lib.validate(tiny_config(shapes_dir, tmp_path, phases=PHASES))
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    (folder,) = (tmp_path / "features" / "cached" / "activations").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["rows"]["val"] == len(
        index.splits["val"]
    )
    cut, _ = cut_lib.find_cut(model_lib.find_base(b), sorted(trained))
    head = cut_lib.training_model(b, model_lib.find_base(b), cut)
    val_rows = np.load(folder / "val.npy")
    from finetune_cli.data import pipeline

    images = np.stack(
        [np.asarray(pipeline.load_image(p, (32, 32))) for p in index.files("val")]
    )
    np.testing.assert_allclose(
        head.predict(val_rows, verbose=0), b.predict(images, verbose=0), atol=1e-4
    )


def test_head_features_computed_from_the_activation_cache_equal_the_base(
    shapes_dir, tmp_path
):
    # A head phase before a phase on cached activations takes its features
    # from that cache (the top over the rows): the bottom runs once for both.
    from finetune_cli.cache import heads as feature_training
    from finetune_cli.cache import features
    from finetune_cli.cache import extract as extract_lib
    from finetune_cli.data import pipeline

    weights = tmp_path / "pre.weights.h5"
    lively_base().save_weights(str(weights))
    raw = tiny_config(
        shapes_dir,
        tmp_path,
        phases=[{"name": "head", "epochs": 1}, *PHASES],
        augmentation=[{"type": "flip"}, {"type": "contrast", "factor": 0.2}],
    )
    raw["model"]["weights"] = str(weights)
    raw["feature_cache"].update(augmented="views", views=2, activation_dtype="float32")
    cfg = config_lib.validate(raw)
    model, base = model_lib.build_model(cfg, 4)
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    plans = phases_lib.plan_phases(model, base, cfg)
    assert [p.path for p in plans] == ["views", "activations"]

    extractor = features.extractor_from(
        base, model_lib.find_preprocessing(model), cfg.data.image_size
    )
    augmenter = pipeline.build_augmenter(cfg.augmentation, cfg.experiment.seed)
    direct = {
        split: features.get_features(
            cfg,
            extractor,
            index,
            split,
            tmp_path / "direct" / split,
            quiet(),
            views=views,
            augmenter=augmenter if views > 1 else None,
        )[0].load()[0]
        for split, views in (("train", 2), ("val", 1))
    }
    assert np.abs(direct["train"]).mean() > 1e-3  # features carry signal

    cached = feature_training.cached_datasets(
        cfg, quiet(), model, base, index, "views", cut_layers=plans[1].layer_names
    )
    np.testing.assert_allclose(cached.train[0], direct["train"], atol=1e-5)
    np.testing.assert_allclose(cached.val[0], direct["val"], atol=1e-5)
    root = extract_lib.cache_root(cfg)
    manifest = json.loads((root / "train-2views" / "manifest.json").read_text())
    assert manifest["key_fields"]["derived_from"].startswith(
        f"activations at {plans[1].cut}"
    )
    # The later phase uses that cache instead of running the bottom again,
    # and says it was built above, not "reused".
    buf = io.StringIO()
    data = activations.activation_datasets(
        cfg, Output(file=buf), model, base, index, plans[1].layer_names
    )
    assert "the cache built above" in buf.getvalue()
    assert "reusing" not in buf.getvalue()
    # The datasets declare the number of batches they yield, so Keras
    # neither runs them out to find it nor warns that they "ran out of data".
    for ds, n in (
        (data.val_dataset(), len(index.splits["val"])),
        (data.train_dataset(0, 3), 3 * len(index.splits["train"])),
        (data.train_dataset(0, 2, per_epoch=10), 2 * 8),  # full batches only
    ):
        sizes = [len(x) for x, _ in ds]
        assert sum(sizes) == n and int(ds.cardinality()) == len(sizes)
    data.head.compile(loss="categorical_crossentropy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.head.evaluate(data.val_dataset(), verbose=0)
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    assert len(list((root / "activations").iterdir())) == 1
    # A cache of directly extracted features (extract) is preferred.
    direct_root = tmp_path / "direct"
    for split in ("train", "val"):
        target = root / ("train-2views" if split == "train" else "val")
        shutil.rmtree(target)
        shutil.copytree(direct_root / split, target)
    again = feature_training.cached_datasets(
        cfg, quiet(), model, base, index, "views", cut_layers=plans[1].layer_names
    )
    np.testing.assert_array_equal(again.train[0], direct["train"])


@pytest.mark.parametrize(
    "augmented, path, note",
    [
        ("views", "activations", None),
        ("faithful", "base", "augmentation is declared with feature_cache.augmented"),
    ],
)
def test_the_plan_says_which_phases_take_the_cache_and_why_not(
    shapes_dir, tmp_path, augmented, path, note
):
    raw = tiny_config(
        shapes_dir,
        tmp_path,
        phases=[{"name": "head", "epochs": 1}, *PHASES],
        augmentation=[{"type": "flip"}],
    )
    raw["feature_cache"]["augmented"] = augmented
    cfg = config_lib.validate(raw)
    model, base = model_lib.build_model(cfg, 4)
    plans = phases_lib.plan_phases(model, base, cfg)
    head_path = "views" if augmented == "views" else "base"
    assert [p.path for p in plans] == [head_path, path]
    rows = summary_lib.plan_rows(plans, cfg, 1)
    if path == "activations":
        assert rows[1][-1].startswith("cached activations at block_")
        assert rows[1][-1].endswith(", 2 augmented views")  # the default
    notes = summary_lib.path_notes(plans, cfg)
    if note is None:
        assert notes == []
    else:
        (only,) = notes
        assert only.startswith("phase 2 (top) runs the base: ") and note in only
    # Under tf.distribute the whole model runs.
    assert phases_lib.plan_phases(model, base, cfg, distributed=True)[1].path == "base"


def test_the_shared_run_took_its_head_features_from_its_activation_cache(
    finished_run,
):
    # Augmentation with the default views: the head phase trains on cached
    # views computed from the top phase's activation cache (one bottom pass).
    log = (finished_run.run / "log.txt").read_text()
    assert "(cached features, 2 augmented views)" in log
    assert "features [train] from activations at" in log
    assert "extract [train]" not in log
    assert "activations at" in log and "the cache built above" in log
    assert "reusing" not in log  # built in this run, not reused
