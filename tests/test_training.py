"""Phases really do what they declare: weights that must not move do not."""

import csv
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli import data as data_lib
from finetune_cli import model as model_lib
from finetune_cli import training
from finetune_cli.cli import app
from finetune_cli.console import Output

from conftest import make_config
from conftest import tiny_config


def snapshot(layers):
    return {l.name: [w.numpy().copy() for w in l.weights] for l in layers}


def changed(before, after_layers):
    return {l.name: [not np.array_equal(a, w.numpy())
                     for a, w in zip(before[l.name], l.weights)]
            for l in after_layers}


def fit_phase(cfg, phase_index, model, base, steps=3):
    import keras

    phase = cfg.phases[phase_index]
    names = model_lib.select_layers(base, phase.trainable, "t")
    model_lib.apply_trainable(model, base, names, phase.batchnorm)
    training.compile_phase(model, phase, steps, 4, jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8 * steps, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 4, 8 * steps), 4)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return names


@pytest.fixture
def built(shapes_dir, tmp_path):
    def build(phases, **sections):
        cfg = make_config(shapes_dir, tmp_path, phases=phases, **sections)
        model, base = model_lib.build_model(cfg, 4)
        return cfg, model, base
    return build


def test_frozen_base_is_bit_identical_and_head_trains(built):
    cfg, model, base = built([{"name": "head", "epochs": 1, "trainable": "none",
                               "learning_rate": 1e-2}],
                             head=[{"type": "dense", "units": 8}])
    base_before = snapshot(model_lib.base_layers(base))
    head = [model.get_layer("head_0_dense"), model.get_layer("predictions")]
    head_before = snapshot(head)
    fit_phase(cfg, 0, model, base)
    for name, flags in changed(base_before, model_lib.base_layers(base)).items():
        assert not any(flags), f"base layer {name} moved"
    for name, flags in changed(head_before, head).items():
        assert all(flags), f"head layer {name} did not train"


def test_top_n_trains_exactly_the_top_layers(built):
    import keras

    n = 12
    cfg, model, base = built([{"name": "ft", "epochs": 1, "trainable": {"top": n},
                               "learning_rate": 1e-2}])
    layers = model_lib.base_layers(base)
    before = snapshot(layers)
    names = fit_phase(cfg, 0, model, base)
    assert names == [l.name for l in layers[-n:]]
    diff = changed(before, layers)
    top = {l.name for l in layers[-n:]}
    trained_some = False
    for layer in layers:
        flags = diff[layer.name]
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        if layer.name in top and layer.weights and not is_bn:
            assert all(flags), f"{layer.name} is in the top {n} but did not train"
            trained_some = True
        else:
            # Earlier layers, and every BN layer (moving statistics
            # included) under the default `batchnorm: frozen` policy.
            assert not any(flags), f"{layer.name} moved"
    assert trained_some


def test_batchnorm_train_policy_updates_bn_in_range_only(built):
    import keras

    cfg, model, base = built([{"name": "ft", "epochs": 1, "trainable": {"top": 12},
                               "batchnorm": "train", "learning_rate": 1e-2}])
    layers = model_lib.base_layers(base)
    bns = [l for l in layers if isinstance(l, keras.layers.BatchNormalization)]
    before = snapshot(bns)
    fit_phase(cfg, 0, model, base)
    top = {l.name for l in layers[-12:]}
    for layer in bns:
        flags = changed(before, [layer])[layer.name]
        if layer.name in top:
            assert all(flags), f"{layer.name} (gamma, beta, moving stats) frozen"
        else:
            assert not any(flags), f"{layer.name} moved"


def test_schedules_warmup_and_cosine():
    import keras

    phase = config_lib.Phase(name="p", epochs=4, learning_rate=1e-3,
                             schedule={"name": "cosine", "warmup_epochs": 1})
    lr = training.build_learning_rate(phase, steps_per_epoch=10)
    assert isinstance(lr, keras.optimizers.schedules.CosineDecay)
    values = [float(lr(s)) for s in (0, 5, 10, 25, 39)]
    assert values[0] == 0.0 and values[1] == pytest.approx(5e-4)
    assert values[2] == pytest.approx(1e-3) and values[4] < values[3] < 1e-3
    flat = training.build_learning_rate(
        config_lib.Phase(name="p", epochs=3, schedule="warmup"), 10)
    assert float(flat(10)) == pytest.approx(1e-3) == float(flat(29))
    exp = training.build_learning_rate(
        config_lib.Phase(name="p", epochs=3, schedule={"name": "exponential",
                                                       "decay_rate": 0.5}), 10)
    assert float(exp(20)) == pytest.approx(2.5e-4)
    assert training.build_learning_rate(config_lib.Phase(name="p", epochs=1), 5) == 1e-3


def test_class_weight_auto_and_by_name(shapes_dir, tmp_path):
    cfg = make_config(shapes_dir, tmp_path)
    index = data_lib.index_data(cfg.data, 0)
    index.splits["train"] = index.splits["train"][:-2]  # two fewer triangles
    auto = training.resolve_class_weight(
        config_lib.Phase(name="p", epochs=1, class_weight="auto"), 0, index)
    counts = index.counts("train")
    assert auto[3] > auto[0]
    assert sum(auto[i] * c for i, c in enumerate(counts)) == pytest.approx(sum(counts))
    named = training.resolve_class_weight(
        config_lib.Phase(name="p", epochs=1, class_weight={"star": 3}), 0, index)
    assert named == {0: 1.0, 1: 1.0, 2: 3.0, 3: 1.0}
    from finetune_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"phases.2.class_weight: unknown "
                                          r"classes \['stra'\]"):
        training.resolve_class_weight(
            config_lib.Phase(name="p", epochs=1, class_weight={"stra": 3}), 2,
            index)


def test_two_phase_run_end_to_end(shapes_dir, tmp_path):
    """The schedule switches, epochs continue, the run folder is complete."""
    import io

    import keras

    # Weights written by a test: the "pretrained" base.
    keras.utils.set_random_seed(0)
    base = model_lib.build_base(config_lib.Model(
        name="MobileNetV2", weights="none", options={"alpha": 0.35}), (32, 32))
    weights = tmp_path / "pre.weights.h5"
    base.save_weights(str(weights))
    raw = tiny_config(shapes_dir, tmp_path, phases=[
        {"name": "head", "epochs": 2, "learning_rate": 1e-2},
        {"name": "top", "epochs": 2, "trainable": {"top": 8},
         "optimizer": {"name": "sgd", "momentum": 0.9},
         "learning_rate": 3e-4, "class_weight": "auto", "label_smoothing": 0.1},
    ], augmentation=[{"type": "flip"}, {"type": "contrast", "factor": 0.1}])
    raw["model"]["weights"] = str(weights)
    cfg = config_lib.validate(raw)
    buf = io.StringIO()
    result = training.finetune(cfg, Output(file=buf))
    run = result.run_dir

    # The schedule really switched: phase 2's optimizer and LR.
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    assert [r["phase"] for r in history] == ["head", "head", "top", "top"]
    assert [float(r["lr"]) for r in history] == pytest.approx(
        [1e-2, 1e-2, 3e-4, 3e-4])
    metrics = json.loads((run / "metrics.json").read_text())
    assert [p["optimizer"] for p in metrics["phases"]] == ["Adam", "SGD"]
    assert [p["last_epoch"] for p in metrics["phases"]] == [2, 4]
    assert 0 <= metrics["test"]["accuracy"] <= 1

    # Everything the run directory promises is there and loads.
    for name in ("config.yaml", "labels.txt", "history.csv", "best.keras",
                 "last.keras", "metrics.json", "environment.json", "log.txt",
                 "status.json", "base.weights.h5", "split.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "labels.txt").read_text().split() == [
        "circle", "square", "star", "triangle"]
    assert config_lib.load_config(run / "config.yaml") == cfg
    env = json.loads((run / "environment.json").read_text())
    assert env["tensorflow"] and env["devices"]
    model = keras.saving.load_model(run / "best.keras", safe_mode=True)
    x = np.stack([np.asarray(data_lib.load_image(p, (32, 32)))
                  for p in data_lib.index_data(cfg.data, 3).files("val")])
    probs = np.asarray(model.predict(x, verbose=0))
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    # The base weights file fine-tunes onward: it loads into a fresh base.
    again = model_lib.build_base(config_lib.Model(
        name="MobileNetV2", weights=str(run / "base.weights.h5"),
        options={"alpha": 0.35}), (32, 32))
    assert len(again.weights) == len(base.weights)
    assert (run.parent / "latest").resolve() == run.resolve()
    text = buf.getvalue()
    assert "phase head: val_accuracy" in text and "phase top: val_accuracy" in text
    assert "\x1b[" not in text  # plain output when not a terminal


def test_training_data_has_grayscale_rgba_gif_bmp(shapes_dir, tmp_path):
    """The end-to-end run above trains and validates on these files."""
    from PIL import Image

    cfg = make_config(shapes_dir, tmp_path)
    index = data_lib.index_data(cfg.data, 3)
    files = index.files("train") + index.files("val")
    modes = {(Image.open(f).mode, f.rsplit(".", 1)[1]) for f in files}
    assert {("L", "png"), ("RGBA", "png"), ("P", "gif"), ("RGB", "bmp")} <= modes


def test_corrupt_image_is_caught_before_training_or_skipped(tmp_path):
    from finetune_cli import synthetic

    data = tmp_path / "data"
    synthetic.generate(data, "source", per_class=4, size=32)
    (data / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    path = tmp_path / "c.yaml"
    raw = tiny_config(data, tmp_path)
    raw["data"]["split"] = {"train": 0.75, "val": 0.25, "test": 0.0}
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["finetune", str(path)])
    assert result.exit_code == 3, result.output
    assert "bad image" in result.output and "broken.jpg" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "t").exists() or not any(
        p.is_dir() for p in (tmp_path / "runs" / "t").iterdir())
    result = CliRunner().invoke(app, ["finetune", str(path), "--set",
                                      "data.on_bad_image=skip"])
    assert result.exit_code == 0, result.output
    (run,) = [p for p in (tmp_path / "runs" / "t").iterdir() if p.name[0].isdigit()]
    skipped = (run / "skipped_images.txt").read_text()
    assert "broken.jpg" in skipped and "not a readable image" in skipped
    split = json.loads((run / "split.json").read_text())
    assert sum(v["files"] for v in split.values()) == 16  # 17 files, 1 skipped
