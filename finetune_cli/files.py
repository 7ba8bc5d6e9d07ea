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
        # File names that are not UTF-8 go back out as the bytes they were.
        text = {"encoding": "utf-8", "errors": "surrogateescape"}
        with open(tmp, mode, **({} if mode == "wb" else text)) as f:
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


# Reading back what was written. A run folder lives for months: a file in
# it may be truncated by a full disk, emptied, overwritten or deleted by
# hand. Readers go through these, so the damage is reported once, naming
# the file and what to do, instead of surfacing as a JSONDecodeError.


def damaged(path, problem: str, todo: str = ""):
    """A DamagedFile error for `path` (to raise)."""
    from finetune_cli.errors import DamagedFile

    return DamagedFile(f"{path}: {problem}" + (f"; {todo}" if todo else ""))


def read_text(path, *, todo: str = "", missing_ok: bool = False):
    """The UTF-8 text of a file we wrote, or None when it is missing and
    `missing_ok`.

    Raises:
        DamagedFile: missing (unless `missing_ok`), unreadable or not text.
    """
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise damaged(path, "missing", todo) from None
    except UnicodeDecodeError:
        raise damaged(path, "not text (garbled)", todo) from None
    except IsADirectoryError:
        raise damaged(path, "a folder where a file belongs", todo) from None
    except OSError as e:
        raise damaged(path, f"unreadable ({e.strerror})", todo) from None


def read_json(path, *, todo: str = "", missing_ok: bool = False, kind=dict):
    """A JSON file we wrote, checked to hold a `kind` (a dict by default);
    None when missing and `missing_ok`.

    Raises:
        DamagedFile: missing, empty, truncated, garbled or of another shape.
    """
    text = read_text(path, todo=todo, missing_ok=missing_ok)
    if text is None:
        return None
    if not text.strip():
        raise damaged(path, "empty", todo)
    try:
        value = json.loads(text)
    except ValueError:
        raise damaged(path, "not valid JSON (truncated or garbled)", todo) from None
    if not isinstance(value, kind):
        raise damaged(
            path, f"expected a JSON {kind.__name__}, found {type(value).__name__}", todo
        )
    return value


# Writes that fail for want of space or permission. Keras, h5py, NumPy and
# TensorFlow raise these in their own types, some with the errno only in
# the text, so both are looked at, along the exception's chain.
_STORAGE_ERRNOS = {
    28: "the disk is full",
    122: "the disk quota is exceeded",
    30: "the file system is read-only",
    13: "permission denied",
    1: "permission denied",
}
_STORAGE_TEXTS = {
    "No space left on device": 28,
    "Disk quota exceeded": 122,
    "Read-only file system": 30,
    "Permission denied": 13,
}


def storage_error(e: BaseException, todo: str = "", where=None):
    """A StorageError saying what `e` is (disk full, read-only, ...) and
    naming the path where it is known (else `where`, the file or folder
    being written), or None when `e` is another kind of failure."""
    fallback = where
    import re

    from finetune_cli.errors import StorageError

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        text = str(e)
        if code not in _STORAGE_ERRNOS:
            code = next((c for t, c in _STORAGE_TEXTS.items() if t in text), None)
        if code is not None:
            where = getattr(e, "filename", None)
            if not where:
                m = re.search(r"(?:file|path|name)\s*[=:]?\s*'([^']+)'", text)
                where = m.group(1) if m else fallback
            problem = _STORAGE_ERRNOS[code]
            head = f"{where}: {problem}" if where else f"{problem} ({text[:160]})"
            return StorageError(
                f"{head}; nothing written before was lost (every file is "
                "written whole or not at all)" + (f"; {todo}" if todo else "")
            )
        e = e.__cause__ or e.__context__
    return None
