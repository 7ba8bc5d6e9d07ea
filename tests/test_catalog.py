"""`finetune-cli models list`: every application, its input sizes, where
its weights come from here, and sizes and speed measured on request."""

import json

import pytest
from typer.testing import CliRunner

from finetune_cli.cli.main import app
from finetune_cli.model import catalog
from finetune_cli.model.applications import APPLICATIONS

runner = CliRunner()


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras-home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


def test_weights_files_are_matched_to_their_application(keras_home, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mobilenet_v2_1.0_224_imagenet_no_top.h5").write_bytes(b"")
    (
        keras_home / "models" / "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    ).write_bytes(b"")
    (keras_home / "models" / "efficientnetb0.h5").write_bytes(b"")  # has a top
    assert catalog.local_weights("MobileNetV2", [mine]).endswith("no_top.h5")
    assert catalog.local_weights("MobileNetV2") is None  # not in the Keras cache
    assert catalog.local_weights("MobileNet", [mine]) is None  # v1 is not v2
    assert catalog.local_weights("ResNet50V2") is not None
    assert catalog.local_weights("ResNet50") is None  # v1 is not v2
    assert catalog.local_weights("EfficientNetB0") is None  # not a no-top file


def test_models_list_shows_every_application(keras_home, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mobilenet_v2_1.0_224_imagenet_no_top.h5").write_bytes(b"")
    result = runner.invoke(
        app, ["models", "list", "--json", "--weights-dir", str(mine)]
    )
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert list(rows) == list(APPLICATIONS)
    assert rows["MobileNetV2"]["weights"] == "local"
    assert rows["ResNet50"]["weights"] == "download"
    assert (rows["Xception"]["default_size"], rows["Xception"]["min_size"]) == (299, 71)
    result = runner.invoke(app, ["models", "list", "--plain"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert all(len(line) <= 80 for line in result.output.splitlines())
    assert "EfficientNetV2L" in result.output


def test_measure_counts_parameters_and_is_kept_for_later(keras_home):
    import keras

    result = runner.invoke(
        app, ["models", "list", "mobilenetv3small", "--measure", "--json"]
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    base = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg"
    )
    assert row["params"] == base.count_params() and row["latency_ms"] > 0
    # A later listing shows it without building anything.
    result = runner.invoke(app, ["models", "list", "MobileNetV3Small", "--json"])
    assert json.loads(result.output)[0]["params"] == base.count_params()


def test_an_unknown_model_name_is_a_config_error_with_a_hint(keras_home):
    result = runner.invoke(app, ["models", "list", "MobileNetV5"])
    assert result.exit_code == 2
    assert (
        "did you mean" in result.output and "Received: 'MobileNetV5'" in result.output
    )
