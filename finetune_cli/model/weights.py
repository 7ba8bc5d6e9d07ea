"""Weights files: checked before anything is built.

`check_weights` refuses a missing file, a folder, a name that is not
`.h5`/`.hdf5`, and a file that is not HDF5 (what Keras weights files are),
each as a config error naming `model.weights`. No TensorFlow here.
"""

from __future__ import annotations

from pathlib import Path

from finetune_cli.errors import relative_note
from finetune_cli.errors import ConfigError


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def check_weights(weights: str, key: str = "model.weights") -> None:
    """Raise ConfigError naming `key` unless `weights` is a readable HDF5 file."""
    path = Path(weights)
    if not path.exists():
        raise ConfigError(f"{key}: file not found: {weights}{relative_note(weights)}")
    if path.is_dir():
        raise ConfigError(
            f"{key}: {weights} is a folder; expected "
            "imagenet, none or a .h5 / .weights.h5 file"
        )
    if not weights.endswith((".h5", ".hdf5")):
        raise ConfigError(
            f"{key}: expected imagenet, none or a .h5 / .weights.h5 "
            f"file. Received: {weights!r}"
        )
    try:
        with open(path, "rb") as f:
            magic = f.read(len(HDF5_MAGIC))
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {weights}: {e}") from None
    if magic != HDF5_MAGIC:
        raise ConfigError(
            f"{key}: {weights} is not an HDF5 file "
            "(Keras weights files are HDF5: the file is damaged "
            "or of another kind)"
        )
