"""Grad-CAM overlays: `explain` on a run, the feature layer per application."""

import csv

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.evaluate import explain
from finetune_cli.model import build as model_lib
from finetune_cli.model import saved as runmodel
from finetune_cli.cli.main import app

runner = CliRunner()


def test_explain_writes_one_overlay_per_image_and_never_overwrites(
    finished_run, tmp_path
):
    images = sorted((finished_run.data / "star").iterdir())
    out = tmp_path / "why"
    result = runner.invoke(
        app,
        ["explain", str(finished_run.run), str(finished_run.data / "star")]
        + ["--out", str(out), "--plain"],
    )
    assert result.exit_code == 0, result.output
    assert f"explained {len(images)} images; wrote {out}" in result.output
    rows = list(csv.DictReader(open(out / "explanations.csv")))
    assert [r["file"] for r in rows] == [str(p) for p in images]
    labels = (finished_run.run / "labels.txt").read_text().split()
    assert {r["predicted"] for r in rows} <= set(labels)
    for r in rows:
        assert 0 < float(r["confidence"]) <= 1
        with Image.open(out / r["overlay"]) as im:
            assert im.format == "PNG" and max(im.size) == explain.OVERLAY_SIDE
    # The same folder again: refused, and what is there is kept.
    before = sorted(p.name for p in out.iterdir())
    again = runner.invoke(
        app, ["explain", str(finished_run.run), str(images[0]), "--out", str(out)]
    )
    assert again.exit_code == 2 and "already exists" in again.output
    assert sorted(p.name for p in out.iterdir()) == before


def test_unreadable_image_is_named_and_nothing_is_written(finished_run, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "why"
    result = runner.invoke(
        app, ["explain", str(finished_run.run), str(bad), "--out", str(out)]
    )
    assert result.exit_code == 3, result.output
    assert str(bad) in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".why.partial-*"))


def test_heat_maps_are_in_unit_range_and_follow_the_predicted_class(finished_run):
    target = runmodel.resolve_target(finished_run.run)
    model = runmodel.load_model(target)
    cam = explain.GradCam(model)
    files = sorted(str(p) for p in finished_run.data.glob("*/*"))[:6]
    x = explain.load_images(files, cam.image_size)
    heat, probs = cam(x)
    assert heat.shape == (6, 32, 32) and heat.min() >= 0 and heat.max() <= 1
    want = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs, want, atol=1e-5)


@pytest.mark.parametrize(
    "name, layer",
    [
        ("MobileNetV2", "out_relu"),
        ("ResNet50", "conv5_block3_out"),
        ("VGG16", "block5_pool"),
    ],
)
def test_feature_layer_is_the_last_spatial_map_of_each_application(name, layer):
    cfg = config_lib.Model(name=name, weights="none")
    base = model_lib.build_base(cfg, (32, 32))
    assert explain.feature_layer(base) == layer


def _one_per_family():
    from finetune_cli.model import applications

    first = {}
    for name, spec in applications.APPLICATIONS.items():
        first.setdefault(spec.module, name)
    return sorted(first.values())


@pytest.mark.heavy
@pytest.mark.parametrize("name", _one_per_family())
def test_grad_cam_runs_through_every_family_of_the_registry(name):
    # The feature layer is found per architecture, and the gradient has to
    # pass each family's own layers (preprocessing inside the base,
    # squeeze-excite, layer scale, ...): one model of each family, built
    # as finetune builds it, explained like `explain` does.
    import keras

    from finetune_cli.model import applications

    size = max(applications.get(name).min_size, 32)
    cfg = config_lib.validate(
        {
            "data": {"dir": "x", "image_size": size},
            "model": {"name": name, "weights": "none"},
            "phases": [{"name": "head", "epochs": 1}],
        }
    )
    model, base = model_lib.build_model(cfg, 3)
    cam = explain.GradCam(model)
    shape = base.get_layer(cam.layer).output.shape
    assert len(shape) == 4 and shape[1] >= 1 and shape[2] >= 1
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    heat, probs = cam(x)
    assert heat.shape == (2, size, size) and np.isfinite(heat).all()
    np.testing.assert_allclose(probs, model.predict(x, verbose=0), atol=1e-5)
    keras.backend.clear_session()


def _shapes(rng, n, size=32, r=5):
    """Images of one coloured shape on grey noise, and the shape's mask.

    Class 0 is a red filled square, 1 a green cross, 2 a blue ring: each
    class has evidence of its own at one place in the image.
    """
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 230]], "float32")
    images = rng.uniform(60, 140, (n, size, size, 3)).astype("float32")
    labels = rng.integers(0, 3, n)
    masks = np.zeros((n, size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy = rng.integers(r + 1, size - r - 1, 2)
        dx, dy = abs(xx - cx), abs(yy - cy)
        masks[i] = [
            (dx < r) & (dy < r),
            ((dx <= 1) & (dy <= r)) | ((dy <= 1) & (dx <= r)),
            (np.maximum(dx, dy) <= r) & (np.maximum(dx, dy) >= r - 1),
        ][labels[i]]
        images[i][masks[i]] = colours[labels[i]]
    return images, labels, masks


def test_heat_map_of_a_trained_model_covers_the_shape_not_the_background():
    # A model shaped like ours (preprocessing, a functional base, pooling,
    # the output layer) small enough to learn the shapes in seconds; the
    # heat is then measured against where the shape really is.
    import keras

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    images, labels, _ = _shapes(rng, 900)
    test_images, test_labels, masks = _shapes(rng, 60)
    base_in = keras.Input((32, 32, 3))
    x = base_in
    for layer in [
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
    ]:
        x = layer(x)
    base = keras.Model(base_in, x, name="base")
    inputs = keras.Input((32, 32, 3))
    x = base(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name=model_lib.OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(images, labels, epochs=10, batch_size=32, verbose=0)
    cam = explain.GradCam(model)
    assert cam.layer == base.layers[-1].name  # the 8x8 map
    heat, probs = cam(test_images)
    assert (probs.argmax(1) == test_labels).mean() >= 0.95
    inside = np.array([h[m].mean() for h, m in zip(heat, masks, strict=True)])
    outside = np.array([h[~m].mean() for h, m in zip(heat, masks, strict=True)])
    assert (inside > outside).mean() >= 0.95
    for c in range(3):
        # Every class, not only the easiest: the shape is where it looked.
        sel = test_labels == c
        assert inside[sel].mean() > 2 * outside[sel].mean(), c
