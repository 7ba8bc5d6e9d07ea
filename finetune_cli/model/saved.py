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
from finetune_cli.files import damaged
from finetune_cli.files import read_text

# What to do about a damaged model or labels file of a run folder.
RETRAIN = (
    "restore it from a backup, or train again with "
    "`finetune-cli finetune {run}/config.yaml`"
)
LABELS_TODO = (
    "it must hold the class names, one per line, in the model's output order "
    '(a run\'s classes are also listed under "classes" in its split.json); '
    "restore it"
)


@dataclasses.dataclass
class Target:
    """A model to evaluate: the file, its labels, and its run folder if any."""

    model_path: Path
    labels: list[str]
    run_dir: Optional[Path]
    # A remote run folder (or model's folder) this local mirror stands for:
    # what is written into it is uploaded there (`remote.push`).
    remote: Optional[str] = None


def resolve_target(path) -> Target:
    """A run folder (uses best.keras) or a .keras file with labels.txt beside.

    Raises:
        ConfigError: the path is neither, or labels.txt is missing.
    """
    from finetune_cli import remote

    path, origin = remote.local_run(path)
    if path.is_dir():
        model_path = path / "best.keras"
        if not model_path.is_file():
            if _finished(path):
                raise damaged(model_path, "missing", RETRAIN.format(run=path))
            raise ConfigError(f"{path} is not a finished run folder: no best.keras")
        run_dir = path
    elif path.is_file() and path.suffix == ".keras":
        model_path, run_dir = path, None
        if any(
            (path.parent / f).is_file()
            for f in ("config.yaml", "status.json", "split.json")
        ):
            run_dir = path.parent
    else:
        raise ConfigError(f"expected a run folder or a .keras file. Received: {path}")
    labels_path = model_path.parent / "labels.txt"
    if not labels_path.exists() and path.is_dir():
        raise damaged(labels_path, "missing", LABELS_TODO)
    if not labels_path.is_file():
        raise ConfigError(
            f"no labels.txt beside {model_path}; the class names "
            "are needed to read the model's outputs"
        )
    text = read_text(labels_path, todo=LABELS_TODO)
    labels = [la.strip() for la in text.splitlines() if la.strip()]
    if not labels:
        raise damaged(labels_path, "empty", LABELS_TODO)
    if len(set(labels)) != len(labels):
        raise damaged(labels_path, "a class name appears twice", LABELS_TODO)
    return Target(model_path, labels, run_dir, origin)


def _finished(run: Path) -> bool:
    """Whether a folder without best.keras was a run that finished (so the
    model file was lost, not never written)."""
    import json

    try:
        status = json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return (run / "metrics.json").is_file()
    return isinstance(status, dict) and status.get("state") == "completed"


def load_model(target: Target):
    """The model in safe mode, checked against its labels.

    Raises:
        ConfigError: a model with Python code in it (refused).
        DamagedFile: a model file that does not load (truncated, garbled),
            or labels.txt with another count than the model's outputs.
    """
    try:
        model = keras.saving.load_model(
            target.model_path, compile=False, safe_mode=True
        )
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
        import zipfile

        first = text.splitlines()[0] if text else type(e).__name__
        if not zipfile.is_zipfile(target.model_path):
            first = "not a .keras archive: truncated or garbled"
        todo = (
            RETRAIN.format(run=target.run_dir)
            if target.run_dir is not None
            else "expected a model saved by Keras 3 (model.save('x.keras'))"
        )
        if target.run_dir is None:  # the user's own file, not one we wrote
            raise ConfigError(
                f"cannot load {target.model_path}: {first[:120]}; {todo}"
            ) from None
        raise damaged(
            target.model_path, f"not a loadable Keras model ({first[:120]})", todo
        ) from None
    outputs = model.output_shape[-1]
    if outputs != len(target.labels):
        raise damaged(
            target.model_path.parent / "labels.txt",
            f"{len(target.labels)} class names for a model with {outputs} outputs",
            LABELS_TODO,
        )
    return model


def model_image_size(model) -> tuple[int, int]:
    shape = model.input_shape
    return int(shape[1]), int(shape[2])
