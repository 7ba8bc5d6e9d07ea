"""Atomic file writes, shared by every layer.

Every file a run, a cache or an export writes goes through here: written
whole to a temporary file in the same folder, flushed, then renamed over
the target, so a crash leaves either the old file or the new one, never
half of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, data) -> Path:
    """Write text or bytes to `path` through a temporary file and a rename."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same suffix); rename on success.

    The suffix is kept because Keras picks the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem.split('.')[0]}.", suffix=suffix, dir=path.parent
    )
    os.close(fd)
    os.unlink(tmp)  # Keras refuses to overwrite some files; let it create it.
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")
