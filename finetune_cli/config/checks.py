"""Checks of a config against this machine that need no TensorFlow.

`check(cfg)` runs in `config validate`, and before `finetune` and
`extract` do anything else, so a CI job that validates configs learns what
a run would stop on:

- every path the config names exists and is what it should be (a folder
  for `data.dir` and `experiment.output_dir`, a file for `data.csv` and
  `model.weights`), and no file stands where a folder must be created;
- `data.dir` holds class folders (or train/ val/ [test/] of them), and
  `data.csv` starts with a `path,label[,split]` header;
- a `model.weights` file is HDF5 (what Keras weights files are);
- one training batch at `data.image_size` fits in this machine's memory,
  by a deliberately low estimate (so a config it refuses cannot fit).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from finetune_cli.errors import relative_note
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.model.weights import check_weights


# Training keeps activations of every layer for the backward pass; even the
# smallest applications hold far more than 16 input-sized float32 tensors.
ACTIVATION_FACTOR = 16


def check(cfg) -> None:
    """Raise ConfigError or DataError for the first problem found."""
    from finetune_cli import remote

    out_dir = cfg.experiment.output_dir
    if remote.is_remote(out_dir):  # written in a local mirror, then uploaded
        out_dir = remote.mirror_of(out_dir)
    check_output_dir(out_dir, "experiment.output_dir")
    check_tracking(cfg)
    if cfg.feature_cache.enabled:
        cache_dir = cfg.feature_cache.dir
        if remote.is_remote(cache_dir):  # used in a local mirror (remote.py)
            cache_dir = remote.mirror_of(cache_dir)
        check_output_dir(cache_dir, "feature_cache.dir")
    source = cfg.data.dir or cfg.data.csv or cfg.data.records
    if remote.is_remote(source):
        pass  # fetched (dir, csv) or streamed (records) when indexed
    elif cfg.data.dir is not None:
        check_data_dir(Path(cfg.data.dir))
    elif cfg.data.csv is not None:
        check_csv(Path(cfg.data.csv))
    else:
        check_records(Path(cfg.data.records))
    if cfg.model.weights not in ("imagenet", "none"):
        check_weights(remote.fetch(cfg.model.weights))
    if cfg.runtime.distribute == "multi_worker":
        from finetune_cli.runtime import distribute

        distribute.cluster()  # TF_CONFIG set and well formed
    check_memory(cfg)


def check_records(path: Path) -> None:
    """A local `data.records` folder holds a finished pack."""
    if not path.is_dir():
        raise DataError(f"data.records: folder not found: {path}")
    if not (path / "manifest.json").is_file():
        raise DataError(
            f"data.records: {path} has no manifest.json: not a folder written "
            "by `finetune-cli pack`, or a pack that did not finish; pack again"
        )


def check_tracking(cfg) -> None:
    """The tracker a config asks for is installed."""
    if cfg.experiment.tracking.mlflow is not None:
        from finetune_cli.run import tracking

        tracking.require_mlflow()


def _kind(path: Path) -> str:
    return "a folder" if path.is_dir() else "a file"


def check_output_dir(path, key: str) -> None:
    """A folder that exists or can be created: no file in the way, and
    writable (a read-only disk is found before anything runs)."""
    path = Path(path)
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            where = "is" if p == path else f"lies under {p}, which is"
            raise ConfigError(
                f"{key}: {path} {where} a file; expected a "
                "folder (it is created when missing)"
            )
    check_writable(path, key)


def check_writable(path, what: str) -> None:
    """`path`, or the folder it would be created in, can be written.

    Raises:
        StorageError: on a read-only file system or without permission.
    """
    import os

    from finetune_cli.errors import StorageError

    path = Path(path)
    existing = next(p for p in [path, *path.parents] if p.exists())
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "is not writable"
        where = path if existing == path else f"{existing} (where {path} would go)"
        raise StorageError(
            f"{what}: {where} {why}; choose a writable folder. Received: {what}={path}"
        )


def check_data_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data.dir: folder not found: {root}{relative_note(root)}")
    if not root.is_dir():
        raise DataError(
            f"data.dir: {root} is a file; expected a folder of "
            "class folders (or of train/, val/ and test/ folders)"
        )
    if not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        raise DataError(
            f"data.dir: {root} has no class folders; expected one "
            "folder per class (or train/, val/, test/ folders of "
            "class folders)"
        )


def check_csv(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data.csv: file not found: {path}{relative_note(path)}")
    if path.is_dir():
        raise DataError(
            f"data.csv: {path} is a folder; expected a CSV file "
            "with a path,label[,split] header"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"data.csv: cannot read {path}: {e}") from None
    header = [h.strip() for h in header]
    if "path" not in header or "label" not in header:
        raise DataError(
            f"data.csv: {path} needs a header with `path` and "
            f"`label` (optionally `split`). Received: {header[:5]}"
        )


def memory_bytes() -> int:
    """Physical memory of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(cfg) -> None:
    h, w = cfg.data.image_size
    batch = cfg.data.batch_size
    if batch == "auto":  # the probe chooses what fits; one image must
        batch = 1
    need = batch * h * w * 3 * 4 * ACTIVATION_FACTOR
    have = memory_bytes()
    if have and need > have:
        raise ConfigError(
            f"data.image_size {[h, w]} with data.batch_size {batch} needs at "
            f"least {need / 2**30:,.1f} GiB to train (activations of one "
            f"batch); this machine has {have / 2**30:,.1f} GiB. Lower "
            "data.image_size (applications are made for about 224) or "
            f"data.batch_size. Received: data.image_size={[h, w]}"
        )
