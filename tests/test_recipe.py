"""The default recipe and `finetune-cli init`, which writes it for a folder."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.config import recipe
from finetune_cli.cli.main import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def _same_recipe(a, b):
    for key in ("head", "augmentation", "phases", "feature_cache"):
        assert getattr(a, key) == getattr(b, key), key
    assert (a.model.name, a.model.pooling) == (b.model.name, b.model.pooling)


def test_flowers_yaml_is_the_recipe_init_writes(shapes_dir, tmp_path):
    out = tmp_path / "mine.yaml"
    result = runner.invoke(
        app, ["init", str(shapes_dir), "-o", str(out), "--image-size", "32", "--plain"]
    )
    assert result.exit_code == 0, result.output
    assert "32 images in 4 classes" in result.output
    assert "from block_11_expand" in result.output
    generated = config_lib.load_config(out)
    flowers = config_lib.load_config(ROOT / "configs" / "flowers.yaml")
    _same_recipe(generated, flowers)
    assert generated.phases[1].trainable.from_layer == recipe.MEASURED_FIRST_LAYER
    assert generated.data.dir == str(shapes_dir)
    assert generated.data.image_size == (32, 32)
    assert generated.experiment.name == "shapes"
    assert generated.model.weights == "imagenet"


def test_init_takes_a_csv_manifest(shapes_dir, tmp_path):
    import shutil

    data = shutil.copytree(shapes_dir, tmp_path / "photos" / "images")
    rows = ["path,label"] + [
        f"images/{p.relative_to(data)},{p.parent.name}"
        for p in sorted(data.glob("*/*"))
    ]
    csv = tmp_path / "photos" / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "cfg.yaml"
    argv = ["init", str(csv), "-o", str(out), "--image-size", "32"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "32 images in 4 classes" in result.output
    cfg = config_lib.load_config(out)
    assert (cfg.data.csv, cfg.data.dir) == (str(csv), None)
    assert cfg.experiment.name == "photos"


def test_init_never_replaces_a_file_without_force(shapes_dir, tmp_path):
    out = tmp_path / "cfg.yaml"
    out.write_text("mine\n")
    args = ["init", str(shapes_dir), "-o", str(out), "--image-size", "32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_text() == "mine\n"
    result = runner.invoke(app, [*args, "--force", "--name", "again"])
    assert result.exit_code == 0, result.output
    assert config_lib.load_config(out).experiment.name == "again"


@pytest.mark.parametrize(
    "args, code, expected",
    [
        (["missing"], 3, "folder not found"),
        (["empty"], 3, "no class folders"),
        (["one"], 3, "one class (cats); a classifier needs at least 2"),
        (["data", "--model", "MobileNetV7"], 2, "did you mean 'MobileNetV2'"),
        (["data", "--weights", "nope.h5"], 2, "model.weights: file not found"),
        (["data", "--name", "-x"], 2, "experiment.name"),
    ],
)
def test_init_bad_input_writes_nothing(shapes_dir, tmp_path, args, code, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one" / "cats").mkdir(parents=True)
    for name in "abc":
        (tmp_path / "one" / "cats" / f"{name}.png").write_bytes(b"")
    (tmp_path / "data").symlink_to(shapes_dir)
    out = tmp_path / "cfg.yaml"
    args = [str(tmp_path / args[0]), *args[1:]]
    argv = ["init", *args, "-o", str(out), "--image-size", "32"]
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def _base(name):
    from finetune_cli.model import build as model_lib

    cfg = config_lib.Model(name=name, weights="none", pooling="avg")
    return model_lib.build_base(cfg, (32, 32))


@pytest.mark.heavy
def test_block_starts_are_where_one_tensor_crosses_between_blocks():
    from finetune_cli.model import build as model_lib

    layers = model_lib.base_layers(_base("ResNet50"))
    names = [layers[i].name for i in recipe.block_starts(layers)]
    # Each of ResNet50's 16 residual blocks starts at its first convolution;
    # no start inside a block, where the shortcut crosses too.
    depths = {2: 3, 3: 4, 4: 6, 5: 3}
    assert names[1:] == [
        f"conv{s}_block{b}_1_conv" for s, n in depths.items() for b in range(1, n + 1)
    ]


@pytest.mark.heavy
def test_block_starts_see_residuals_written_as_ops():
    # ConvNeXt adds its residual with `x + y`, an op that is not a layer.
    from finetune_cli.model import build as model_lib

    layers = model_lib.base_layers(_base("ConvNeXtTiny"))
    names = [layers[i].name for i in recipe.block_starts(layers)]
    depths = {0: 3, 1: 3, 2: 9, 3: 3}
    assert [n for n in names if "_stage_" in n] == [
        f"convnext_tiny_stage_{s}_block_{b}_depthwise_conv"
        for s, n in depths.items()
        for b in range(n)
    ]


@pytest.mark.heavy
def test_fine_tune_start_uses_top_n_where_keras_named_the_layer():
    from finetune_cli.model import build as model_lib

    inception = model_lib.build_base(
        config_lib.Model(name="InceptionV3", weights="none", pooling="avg"), (75, 75)
    )
    trainable, why = recipe.fine_tune_trainable(inception, "InceptionV3")
    assert set(trainable) == {"top"}
    assert "from the block that starts at conv2d_" in why
    trainable, why = recipe.fine_tune_trainable(_base("MobileNetV2"), "MobileNetV2")
    assert trainable == {"from_layer": "block_11_expand"}


@pytest.mark.heavy
def test_a_generated_config_trains_through_both_caches(shapes_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    result = runner.invoke(
        app, ["init", str(shapes_dir), "-o", str(cfg), "--image-size", "32"]
    )
    assert result.exit_code == 0, result.output
    sets = [
        "model.weights=none",
        "phases.0.epochs=1",
        "phases.1.epochs=1",
        f"experiment.output_dir={tmp_path / 'runs'}",
        f"feature_cache.dir={tmp_path / 'features'}",
    ]
    argv = ["finetune", str(cfg), "--plain"]
    for s in sets:
        argv += ["--set", s]
    result = runner.invoke(app, argv, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "cached features, 2 augmented views" in result.output
    assert "cached activations at block_10_project_BN" in result.output
    assert (tmp_path / "runs" / "shapes" / "latest" / "metrics.json").is_file()
