import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from finetune_cli import config as config_lib  # noqa: E402
from finetune_cli.data import synthetic  # noqa: E402

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

    from finetune_cli.model import build as model_lib

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

    from finetune_cli.model import build as model_lib

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


def _shared_root(tmp_path_factory, config):
    """A folder every pytest-xdist worker of this test run sees (one per run)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


@contextlib.contextmanager
def _exclusive(path):
    """Hold an exclusive lock on `path` across processes (xdist workers)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    run: Path  # the run folder: read it, copy it (`copy_run`) to write in it
    data: Path  # its data folder (4 shapes x 8 images), not to be changed
    raw: dict  # the raw config it ran
    weights: Path  # the "pretrained" base weights file it started from
    output: str  # what `finetune` printed (plain)


# Two phases that exercise most of the schedule: augmentation on a frozen
# base, then a top-N phase with another optimizer, class weights, label
# smoothing; TensorBoard on; a test split for the end-of-run report.
FINISHED_PHASES = [
    {"name": "head", "epochs": 2, "learning_rate": 1e-2},
    {
        "name": "top",
        "epochs": 2,
        "trainable": {"top": 8},
        "optimizer": {"name": "sgd", "momentum": 0.9},
        "learning_rate": 3e-4,
        "class_weight": "auto",
        "label_smoothing": 0.1,
    },
]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, request) -> FinishedRun:
    """One finished tiny run, trained once for the whole test run.

    Every module that needs "a run" reads this one instead of training its
    own (under pytest-xdist the workers share it through a file lock).
    """
    root = _shared_root(tmp_path_factory, request.config) / "finished-run"
    with _exclusive(f"{root}.lock"):
        if not (root / "done.json").is_file():
            shutil.rmtree(root, ignore_errors=True)
            _train_finished_run(root)
    done = json.loads((root / "done.json").read_text())
    return FinishedRun(
        run=Path(done["run"]),
        data=root / "shapes",
        raw=done["raw"],
        weights=root / "pre.weights.h5",
        output=done["output"],
    )


def _train_finished_run(root: Path) -> None:
    import io

    import keras

    from finetune_cli.model import build as model_lib
    from finetune_cli.train import job as trainer
    from finetune_cli.console import Output

    data = root / "shapes"
    synthetic.generate(data, "source", per_class=8, size=32, seed=1)
    keras.utils.set_random_seed(0)
    base = model_lib.build_base(
        config_lib.Model(name="MobileNetV2", weights="none", options={"alpha": 0.35}),
        (32, 32),
    )
    base.save_weights(str(root / "pre.weights.h5"))
    raw = tiny_config(
        data,
        root,
        phases=FINISHED_PHASES,
        augmentation=[{"type": "flip"}, {"type": "contrast", "factor": 0.1}],
    )
    raw["model"]["weights"] = str(root / "pre.weights.h5")
    raw["experiment"]["tensorboard"] = True
    raw["experiment"]["tracking"] = {"mlflow": {}}  # file:<output_dir>/mlruns
    buf = io.StringIO()
    result = trainer.finetune(config_lib.validate(raw), Output(file=buf))
    done = {"run": str(result.run_dir), "raw": raw, "output": buf.getvalue()}
    (root / "done.json").write_text(json.dumps(done))


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run folder, for tests that write into one.

    The copy is not tracked in MLflow (its mlflow.json is left out): what
    it does must not reach the shared run's MLflow run.
    """
    shutil.copytree(
        run, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.json")
    )
    return dest


# The longest modules first: xdist hands a worker a whole module at a time
# (--dist loadfile), so a long one started last makes the other worker idle.
LONGEST_FIRST = (
    "test_promotion",
    "test_features",
    "test_evaluation",
    "test_activations",
    "test_lr_find",
    "test_trainer",
    "test_split",
    "test_rundir",
    "test_export",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))


def stopped_run(data_dir, tmp) -> Path:
    """A run stopped by its time limit after epoch 2 of 3 (exit 7,
    resumable), under a fake clock: interrupted, deterministically."""
    import yaml
    from typer.testing import CliRunner

    from finetune_cli import faults
    from finetune_cli.cli.main import app

    raw = tiny_config(data_dir, tmp, phases=[{"name": "head", "epochs": 3}])
    raw["experiment"]["time_limit"] = "150s"
    (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CLI_CLOCK_STEP", "60")
        mp.setattr(faults, "_ticks", [0])
        result = CliRunner().invoke(app, ["finetune", str(tmp / "c.yaml"), "--plain"])
    assert result.exit_code == 7, result.output
    (run,) = [p for p in (tmp / "runs" / "t").iterdir() if p.name[0] == "2"]
    return run


def positional_model(folder) -> Path:
    """A saved model that tells left from right and top from bottom (a
    dense layer on the pixels, sharpened, not saturated), with labels.txt."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(keras.layers.Flatten()(inputs))
    dense = keras.layers.Dense(4, activation="softmax")
    outputs = dense(x)
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 3, bias])
    folder.mkdir()
    keras.Model(inputs, outputs).save(folder / "model.keras")
    (folder / "labels.txt").write_text("circle\nsquare\nstar\ntriangle\n")
    return folder / "model.keras"
