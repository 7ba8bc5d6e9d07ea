"""The activation cache's files: one `.npy` of rows per split and view,
streamed in and read back by row (no memory map), and the check that a
cache folder is whole before it is reused (a damaged one is rebuilt)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np


@dataclasses.dataclass
class ActivationSet:
    """One cache folder: per-view training rows and validation rows."""

    folder: Path
    manifest: dict

    def file(self, split: str, view: int = 0) -> Path:
        return self.folder / (
            f"train-view{view}.npy" if split == "train" else "val.npy"
        )


def write_rows(path: Path, n: int, dim: int, dtype: str, batches) -> None:
    """Stream [rows, dim] batches into a .npy file (no memory map)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (n, dim)}
        )
        written = 0
        for rows in batches:
            f.write(np.ascontiguousarray(rows, dtype=dtype).tobytes())
            written += len(rows)
        if written != n:
            raise RuntimeError(f"{path}: wrote {written} rows, expected {n}")
        f.flush()
        os.fsync(f.fileno())


def intact(folder: Path) -> Optional[dict]:
    """The manifest of a cache folder whose files are all there at their
    full size, or None (no cache, or a damaged one: it is rebuilt)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        itemsize = np.dtype(manifest["dtype"]).itemsize
        cache = ActivationSet(folder, manifest)
        for split, rows in manifest["rows"].items():
            for view in range(manifest["views"] if split == "train" else 1):
                f = Rows(cache.file(split, view))  # reads the header
                whole = f.offset + rows * manifest["dim"] * itemsize
                if f.shape != (rows, manifest["dim"]) or f.path.stat().st_size != whole:
                    return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if isinstance(manifest, dict) else None


class Rows:
    """Reads rows of a .npy file by index with pread (no memory map, so
    resident memory stays one batch)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
            self.offset = f.tell()
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.row_bytes = self.dtype.itemsize * shape[1]

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in one read."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            buf = os.pread(
                fd,
                (stop - start) * self.row_bytes,
                self.offset + start * self.row_bytes,
            )
        finally:
            os.close(fd)
        return np.frombuffer(buf, self.dtype).reshape(stop - start, self.shape[1])

    def read(self, indices) -> np.ndarray:
        out = np.empty((len(indices), self.shape[1]), self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for j, i in enumerate(indices):
                buf = os.pread(
                    fd, self.row_bytes, self.offset + int(i) * self.row_bytes
                )
                out[j] = np.frombuffer(buf, self.dtype)
        finally:
            os.close(fd)
        return out
