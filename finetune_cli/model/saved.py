"""A saved model of ours and its labels: what evaluate, predict, export and
promotion load.

A target is a run folder (its `best.keras`) or a `.keras` file with
`labels.txt` beside it. Models load in Keras safe mode only, so no Python
code from a model file runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import keras

from finetune_cli.errors import ConfigError


@dataclasses.dataclass
class Target:
    """A model to evaluate: the file, its labels, and its run folder if any."""

    model_path: Path
    labels: list[str]
    run_dir: Optional[Path]


def resolve_target(path) -> Target:
    """A run folder (uses best.keras) or a .keras file with labels.txt beside.

    Raises:
        ConfigError: the path is neither, or labels.txt is missing.
    """
    path = Path(path)
    if path.is_dir():
        model_path = path / "best.keras"
        if not model_path.is_file():
            raise ConfigError(f"{path} is not a finished run folder: no best.keras")
        run_dir = path
    elif path.is_file() and path.suffix == ".keras":
        model_path, run_dir = path, None
        if (path.parent / "config.yaml").is_file():
            run_dir = path.parent
    else:
        raise ConfigError(f"expected a run folder or a .keras file. Received: {path}")
    labels_path = model_path.parent / "labels.txt"
    if not labels_path.is_file():
        raise ConfigError(
            f"no labels.txt beside {model_path}; the class names "
            "are needed to read the model's outputs"
        )
    labels = [la.strip() for la in labels_path.read_text().splitlines() if la.strip()]
    return Target(model_path, labels, run_dir)


def load_model(target: Target):

    try:
        return keras.saving.load_model(target.model_path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - report any load failure plainly
        text = str(e)
        if "safe_mode" in text or "Lambda" in text:
            raise ConfigError(
                f"refusing to load {target.model_path}: it contains a Lambda "
                "layer or other Python code, and finetune-cli only loads "
                "models in Keras safe mode, so no code from a model file "
                "runs. Rebuild the model from standard Keras layers (as "
                "finetune-cli's own models are) and save it again"
            ) from None
        raise ConfigError(
            f"cannot load {target.model_path}: {text.splitlines()[0] if text else e}"
        ) from None


def model_image_size(model) -> tuple[int, int]:
    shape = model.input_shape
    return int(shape[1]), int(shape[2])
