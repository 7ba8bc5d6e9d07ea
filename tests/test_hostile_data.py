"""Hostile data folders, by class, and the one decoder's verdict.

- links: a symlink loop is named before anything is written; a class
  folder that is a link out of the data folder is followed (documented);
- names: file names with a newline or bytes that are not UTF-8 train,
  predict and are named intact; a class folder whose name cannot be one
  line of labels.txt is refused, named;
- images: multi-frame images (first frame) and extreme aspect ratios
  train; an image Pillow reads but TensorFlow's decoder does not is named
  by the pre-flight, before the run folder exists; the same image under
  two classes is named;
- EXIF orientation: applied by the one decoder, so training, predict and
  export's parity check see the same upright image.
"""

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from finetune_cli.cli.main import app
from finetune_cli.errors import EXIT_DATA

from conftest import positional_model
from conftest import tiny_config

runner = CliRunner()


@pytest.fixture
def data(shapes_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root)
    return root


def _train(data, tmp_path, *extra):
    raw = tiny_config(data, tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return runner.invoke(app, ["finetune", str(tmp_path / "c.yaml"), "--plain", *extra])


def _refused(result, *named):
    out = result.output
    assert result.exit_code == EXIT_DATA, out
    assert "Traceback" not in out
    for n in named:
        assert n in out, out


def _no_run(tmp_path):
    runs = tmp_path / "runs"
    assert not runs.exists() or not [p for p in runs.rglob("status.json")]


def _image(path, size=(32, 32), color=(200, 30, 30), fmt=None, **save):
    Image.new("RGB", size, color).save(path, format=fmt, **save)


@pytest.mark.parametrize("where", ["class", "inside"])
def test_a_symlink_loop_is_named_before_anything_is_written(where, data, tmp_path):
    link = data / "loop" if where == "class" else data / "star" / "again"
    link.symlink_to(data if where == "class" else data / "star")
    result = _train(data, tmp_path)
    _refused(result, "symlink loop", str(link))
    _no_run(tmp_path)


def test_a_class_folder_linked_from_outside_is_followed(data, tmp_path):
    outside = tmp_path / "elsewhere" / "star"
    shutil.move(str(data / "star"), outside.parent.mkdir() or outside)
    (data / "star").symlink_to(outside)
    result = _train(data, tmp_path)
    assert result.exit_code == 0, result.output


def test_file_names_with_newlines_and_non_utf8_bytes_train_and_predict(data, tmp_path):
    src = sorted((data / "circle").iterdir())
    odd = [os.fsdecode(b"line\nbreak.png"), os.fsdecode(b"caf\xe9-latin1.png")]
    for s, name in zip(src, odd, strict=False):
        s.rename(data / "circle" / name)
    result = _train(data, tmp_path)
    assert result.exit_code == 0, result.output
    (run,) = [p for p in (tmp_path / "runs" / "t").iterdir() if p.name[0] == "2"]
    out_csv = tmp_path / "p.csv"
    files = [str(data / "circle" / n) for n in odd]
    result = runner.invoke(
        app, ["predict", str(run), *files, "--out", str(out_csv), "--plain"]
    )
    assert result.exit_code == 0, result.output
    import csv

    rows = list(csv.DictReader(open(out_csv, newline="", errors="surrogateescape")))
    assert sorted(r["file"] for r in rows) == sorted(files)
    assert all(r["label"] and not r.get("error") for r in rows)


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", " padded"])
def test_a_class_name_that_cannot_be_a_line_of_labels_txt_is_refused(
    name, data, tmp_path
):
    (data / "star").rename(data / name)
    result = _train(data, tmp_path)
    _refused(result, "class folder", "rename the folder")
    _no_run(tmp_path)


@pytest.mark.heavy
def test_multi_frame_and_extreme_aspect_ratio_images_train(data, tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(
        data / "circle" / "anim.gif", save_all=True, append_images=frames[1:]
    )
    _image(data / "square" / "tall.png", size=(2, 3000))
    _image(data / "star" / "wide.png", size=(3000, 1))
    result = _train(data, tmp_path)
    assert result.exit_code == 0, result.output

    from finetune_cli.data import pipeline

    first = np.asarray(pipeline.load_image(str(data / "circle" / "anim.gif"), (8, 8)))
    assert first[..., 0].mean() > 200 and first[..., 2].mean() < 50  # frame 1


def test_an_image_only_pillow_reads_is_named_by_the_preflight(data, tmp_path):
    # TIFF bytes under a .png name: Pillow reads it, TensorFlow does not.
    _image(data / "circle" / "really-a-tiff.png", fmt="TIFF")
    result = _train(data, tmp_path)
    _refused(result, "really-a-tiff.png", "TensorFlow's decoder")
    _no_run(tmp_path)


def test_the_same_image_under_two_classes_is_named(data, tmp_path):
    one = sorted((data / "circle").iterdir())[0]
    shutil.copy(one, data / "square" / "copied.png")
    result = _train(data, tmp_path)
    _refused(result, "labelled twice", one.name, "copied.png")
    _no_run(tmp_path)
    # Under skip, neither copy is trusted.
    result = _train(data, tmp_path, "--set", "data.on_bad_image=skip")
    assert result.exit_code == 0, result.output
    (run,) = [p for p in (tmp_path / "runs" / "t").iterdir() if p.name[0] == "2"]
    import json

    record = json.loads((run / "split.json").read_text())
    used = [Path(f).name for rows in record["files"].values() for f, _, _ in rows]
    assert one.name not in used and "copied.png" not in used
    skipped = [Path(p).name for p, _ in record["skipped"]]
    assert sorted(skipped) == sorted([one.name, "copied.png"])


@pytest.mark.parametrize("orientation", [2, 5, 6, 7])
def test_exif_orientation_is_applied_the_same_everywhere(orientation, tmp_path):
    from PIL import ImageOps

    from finetune_cli.data import pipeline

    # A left-right gradient with a bright top row: every turn is visible.
    a = np.zeros((24, 40, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 40, dtype=np.uint8)[None, :]
    a[:3] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.jpg"
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
    upright = ImageOps.exif_transpose(Image.open(path))
    ours = np.asarray(pipeline.load_image(str(path), upright.size[::-1]))
    assert ours.shape[:2] == upright.size[::-1]
    assert np.abs(ours - np.asarray(upright, np.float32)).mean() < 4

    # Export's parity check sees the same pixels, and predict the same
    # probabilities as for the upright copy.
    from finetune_cli.deploy import export

    x, _ = export._images([(str(path), 0)], upright.size[::-1], 1, seed=0)
    assert np.abs(x[0] - ours).max() < 1e-3
    # References decoded as TensorFlow decodes (Pillow's JPEG decoder
    # rounds differently), turned by Pillow's own table for the tag.
    import tensorflow as tf

    stored_px = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy()
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }[orientation]
    straight = tmp_path / "upright.png"
    Image.fromarray(stored_px).transpose(method).save(straight)
    from finetune_cli.evaluate import prediction
    from finetune_cli.model.saved import load_model
    from finetune_cli.model.saved import resolve_target

    as_stored = tmp_path / "as-stored.png"
    Image.fromarray(stored_px).save(as_stored)  # the pixels, EXIF dropped
    model = load_model(resolve_target(positional_model(tmp_path / "m")))
    files = [str(path), str(straight), str(as_stored)]
    turned, right, stored = (
        p for _, p, _ in prediction.iter_probabilities(model, files)
    )
    assert np.abs(turned - right).max() < 1e-5
    assert np.abs(turned - stored).max() > 1e-3  # the turn changed what it saw


@pytest.mark.parametrize("endian", ["<", ">"], ids=["II", "MM"])
def test_the_orientation_tag_is_read_as_pillow_reads_it(endian, tmp_path):
    from finetune_cli.data.decode import exif_orientation

    for orientation in range(1, 9):
        exif = Image.Exif()
        exif.endian = endian
        exif[0x0110] = "camera"  # another tag first: the walk must skip it
        exif[0x0112] = orientation
        buf = io.BytesIO()
        # An APP0 (JFIF) segment precedes APP1, as most cameras write.
        Image.new("RGB", (8, 4)).save(buf, "JPEG", exif=exif.tobytes())
        data = buf.getvalue()
        assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation
        assert int(exif_orientation(data)) == orientation, (endian, orientation)
    for fmt in ("PNG", "GIF"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 4)).save(buf, fmt)
        assert int(exif_orientation(buf.getvalue())) == 1
    assert int(exif_orientation(b"\xff\xd8\xff\xe1garbage")) == 1
    assert int(exif_orientation(b"")) == 1


def test_the_exported_bytes_signature_turns_photos_upright_too(tmp_path):
    """serve_bytes decodes in the exported graph with the same decoder:
    a photo stored turned with an EXIF tag scores as its upright copy, and
    not as the pixels as stored (a model that sees where things are)."""
    import tensorflow as tf
    from PIL import ImageOps

    model_file = positional_model(tmp_path / "m")
    result = runner.invoke(
        app,
        [
            *("export", str(model_file), "--format", "saved_model"),
            *("--no-check", "--out", str(tmp_path / "e"), "--plain"),
        ],
    )
    assert result.exit_code == 0, result.output
    a = np.zeros((32, 48, 3), np.uint8)
    a[..., 1] = np.linspace(0, 255, 48, dtype=np.uint8)[None, :]
    a[:4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = tmp_path / "turned.jpg"
    Image.fromarray(a).save(turned, exif=exif.tobytes(), quality=95)
    # The pixels as TensorFlow decodes them (Pillow's JPEG decoder rounds
    # differently), and turned upright as exif_transpose turns tag 6.
    stored = tf.cast(tf.io.decode_jpeg(turned.read_bytes(), channels=3), tf.float32)
    upright = tf.image.rot90(stored, 3)
    assert upright.shape[:2] == ImageOps.exif_transpose(Image.open(turned)).size[::-1]
    sm = tf.saved_model.load(str(tmp_path / "e" / "saved_model"))

    def serve(pixels):
        resized = tf.image.resize(pixels[None], (32, 32))
        return sm.signatures["serve"](pixels=resized)["probabilities"].numpy()

    by_bytes = sm.signatures["serve_bytes"](
        image_bytes=tf.constant([turned.read_bytes()])
    )["probabilities"].numpy()
    assert np.abs(by_bytes - serve(upright)).max() < 1e-5
    assert np.abs(by_bytes - serve(stored)).max() > 1e-3
