"""Grad-CAM overlays: `explain` on a run, the feature layer per application."""

import csv

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli import explain
from finetune_cli import model as model_lib
from finetune_cli import runmodel
from finetune_cli.cli import app

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
