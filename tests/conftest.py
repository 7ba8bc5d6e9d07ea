import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from finetune_cli import config as config_lib  # noqa: E402
from finetune_cli import synthetic  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A tiny real dataset: 4 classes x 8 images, 32x32, mixed formats."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    synthetic.generate(root, "source", per_class=8, size=32, seed=1)
    return root


def tiny_config(data_dir, tmp_path, **sections):
    """A valid raw config for a tiny MobileNetV2 (alpha 0.35, 32x32)."""
    raw = {
        "experiment": {"name": "t", "seed": 3, "output_dir": str(tmp_path / "runs")},
        "data": {
            "dir": str(data_dir),
            "image_size": 32,
            "batch_size": 8,
            "split": {"train": 0.5, "val": 0.25, "test": 0.25},
        },
        "model": {"name": "MobileNetV2", "weights": "none", "options": {"alpha": 0.35}},
        "phases": [{"name": "head", "epochs": 1}],
        "feature_cache": {"dir": str(tmp_path / "features")},
    }
    raw.update(sections)
    return raw


def make_config(data_dir, tmp_path, **sections):
    return config_lib.validate(tiny_config(data_dir, tmp_path, **sections))


def lively_base(gamma_scale: float = 3.0, seed: int = 0):
    """The tiny MobileNetV2 base with features that carry signal.

    Random MobileNetV2 weights with fresh BN statistics shrink activations
    layer after layer, so pooled features are ~1e-11 and every image looks
    the same. Scaling the BN gammas keeps them O(0.1), so outputs depend on
    the weights, the optimizer and the data.
    """
    import keras

    from finetune_cli import model as model_lib

    keras.utils.set_random_seed(seed)
    base = model_lib.build_base(
        config_lib.Model(name="MobileNetV2", weights="none", options={"alpha": 0.35}),
        (32, 32),
    )
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(layer.gamma * gamma_scale)
    return base


def lively_weights(path) -> str:
    """Write `lively_base()` weights to `path` (once) and return it."""
    if not os.path.exists(path):
        lively_base().save_weights(str(path))
    return str(path)


def constant_model(tmp_path, name, cls, shapes_dir):
    """A model that always predicts class `cls`, saved with labels.txt."""
    import keras
    import numpy as np

    from finetune_cli import model as model_lib

    cfg = config_lib.validate(tiny_config(shapes_dir, tmp_path))
    model, _ = model_lib.build_model(cfg, 4)
    out = model.get_layer(model_lib.OUTPUT_NAME)
    kernel, bias = out.get_weights()
    out.set_weights([np.zeros_like(kernel), 10 * np.eye(4)[cls].astype("float32")])
    folder = tmp_path / name
    folder.mkdir()
    model.save(folder / "model.keras")
    (folder / "labels.txt").write_text("circle\nsquare\nstar\ntriangle\n")
    assert isinstance(model, keras.Model)
    return folder / "model.keras"
