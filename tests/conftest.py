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
        "data": {"dir": str(data_dir), "image_size": 32, "batch_size": 8,
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "model": {"name": "MobileNetV2", "weights": "none",
                  "options": {"alpha": 0.35}},
        "phases": [{"name": "head", "epochs": 1}],
        "feature_cache": {"dir": str(tmp_path / "features")},
    }
    raw.update(sections)
    return raw


def make_config(data_dir, tmp_path, **sections):
    return config_lib.validate(tiny_config(data_dir, tmp_path, **sections))
