"""The recorded split: which files a run trained, validated and tested on.

A run writes `split.json` once, before its first epoch:

    {"format": "finetune-cli-split/2",
     "source": "data/flower_photos",
     "classes": ["daisy", ...],
     "splits": {"train": {"files": 2351, "per_class": {"daisy": 506, ...}},
                ...},
     "files": {"train": [["data/flower_photos/daisy/1.jpg", "daisy",
                          "<sha256>"], ...], "val": [...], "test": [...]},
     "skipped": [["path", "why"], ...]}

A multi-label run (`"task": "multi_label"`) lists each file's labels as a
list of class names (empty for an image with none), and `per_class`
counts the images carrying each label.

Everything that judges a run afterwards (`evaluate RUN`, `--compare-to`,
`--promote-to`, `finetune --resume`) reads the files from here instead of
splitting the data folder again, so images added to the folder later never
enter an old run's held-out split, and images skipped by the pre-flight
check stay out of every metric. Each file is identified by the SHA-256 of
its bytes (size and modification time do not survive a copy); a recorded
file that has vanished or changed is named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from finetune_cli.data import index as data_lib
from finetune_cli.data import preflight as preflight_lib
from finetune_cli.errors import DataError
from finetune_cli.errors import short
from finetune_cli.files import damaged
from finetune_cli.files import read_json

FILE = "split.json"
FORMAT = "finetune-cli-split/2"


def record(index: data_lib.DataIndex, skipped=()) -> dict:
    """The split.json record of an index (digests computed where missing).
    An index of shards records the pack's folder and manifest digest
    instead of its files (`records`)."""
    files = {}
    if index.records is not None:
        return {
            "format": FORMAT,
            **({"task": "multi_label"} if index.multi_label else {}),
            "source": index.source,
            "fraction": 1.0,
            "classes": list(index.class_names),
            "records": dict(index.records),
            "splits": index.per_split("files"),
            "files": {},
            "skipped": [],
        }
    names = index.class_names
    for split, samples in index.splits.items():
        files[split] = [
            [
                path,
                [names[i] for i in label] if index.multi_label else names[label],
                index.digests.get(path) or preflight_lib.sha256_file(path),
            ]
            for path, label in samples
        ]
    return {
        "format": FORMAT,
        **({"task": "multi_label"} if index.multi_label else {}),
        "source": index.source,
        "fraction": index.fraction,
        "classes": list(index.class_names),
        "splits": index.per_split("files"),
        "files": files,
        "skipped": [list(item) for item in skipped],
    }


TODO = (
    "it lists the images the run trained, validated and tested on; restore "
    "it from a backup, or judge the model on other images with --data DIR"
)


def read(run_dir) -> Optional[dict]:
    """The run's split record, or None for a run that has no file list
    (written by finetune-cli before split records, 2026-11-23).

    Raises:
        DamagedFile: split.json is missing from a run that wrote one,
            empty, truncated, garbled or not a split record.
    """
    path = Path(run_dir) / FILE
    rec = read_json(path, todo=TODO, missing_ok=not _records_split(run_dir))
    if rec is None:
        return None
    if rec.get("format") != FORMAT:
        if "format" not in rec and "files" not in rec and not _records_split(run_dir):
            return None
        raise damaged(
            path,
            f"not a split record of format {FORMAT!r} (format "
            f"{short(rec.get('format'))})",
            TODO,
        )
    problem = _malformed(rec)
    if problem:
        raise damaged(path, problem, TODO)
    return rec


def _records_split(run_dir) -> bool:
    """Whether the run is of an era that writes split.json (its
    environment.json has the `runtime` record, which came a day later)."""
    import json

    try:
        env = json.loads((Path(run_dir) / "environment.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(env, dict) and "runtime" in env


def _malformed(rec: dict) -> str:
    """What is wrong with a split record's shape ('' when nothing)."""
    classes, files = rec.get("classes"), rec.get("files")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of class names"
    if not isinstance(files, dict):
        return "'files' is not a mapping of split to files"
    for split, rows in files.items():
        if not isinstance(rows, list):
            return f"'files.{split}' is not a list"
        multi = rec.get("task") == "multi_label"
        for row in rows:
            if (
                not isinstance(row, list)
                or len(row) != 3
                or not isinstance(row[0], str)
                or not isinstance(row[2], str)
                or not _known_label(row[1], classes, multi)
            ):
                return f"'files.{split}' holds a malformed entry {short(row)}"
    return ""


def _known_label(label, classes, multi: bool) -> bool:
    if multi:
        return isinstance(label, list) and all(
            isinstance(c, str) and c in classes for c in label
        )
    return isinstance(label, str) and label in classes


def load(
    run_dir,
    splits=None,
    *,
    allow_missing: bool = False,
    warn: Optional[Callable[[str], None]] = None,
    cache_file=None,
    rehash: bool = False,
) -> Optional[data_lib.DataIndex]:
    """The recorded files of `splits` (default: all), checked on disk.

    Every file must still exist with the same content (SHA-256). A file
    the pre-flight verdict cache (`cache_file`) knows, with the size and
    modification time it had when hashed, is not hashed again (unless
    `rehash`): a resume or an evaluation of an unchanged folder costs a
    `stat` per file.

    Returns:
        A DataIndex of the recorded files (in recorded order), or None when
        the run predates recorded splits.

    Raises:
        DataError: naming the files that vanished or changed, unless
            `allow_missing`, which leaves them out and calls `warn`.
    """
    rec = read(run_dir)
    if rec is None:
        return None
    if rec.get("records"):
        return _load_records(run_dir, rec, splits, rehash)
    classes = rec["classes"]
    multi = rec.get("task") == "multi_label"
    wanted = (
        list(rec["files"])
        if splits is None
        else [s for s in splits if s in rec["files"]]
    )
    out: dict[str, list[tuple[str, int]]] = {}
    digests: dict[str, str] = {}
    problems: list[str] = []
    known = {} if rehash else preflight_lib.read_cache(cache_file)
    for split in wanted:
        kept = []
        for path, label, digest in rec["files"][split]:
            why = _check(path, digest, known.get(path))
            if why:
                problems.append(f"{path} ({split}): {why}")
                continue
            if multi:
                kept.append((path, tuple(sorted(classes.index(c) for c in label))))
            else:
                kept.append((path, classes.index(label)))
            digests[path] = digest
        out[split] = kept
    if problems:
        listed = "; ".join(problems[:5])
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        what = (
            f"{len(problems)} file(s) recorded in {Path(run_dir) / FILE} "
            f"are gone or changed: {listed}{more}"
        )
        if not allow_missing:
            raise DataError(
                f"{what}. The run's held-out metrics are only comparable on "
                "the same files: restore them, or pass --allow-missing to "
                "leave them out"
            )
        if warn is not None:
            warn(f"{what}; left out (--allow-missing)")
    return data_lib.DataIndex(
        list(classes),
        out,
        rec.get("source", ""),
        digests,
        rec.get("fraction", 1.0),
        multi_label=multi,
    )


def _load_records(run_dir, rec, splits, rehash: bool) -> data_lib.DataIndex:
    """A run on shards: its pack, checked by the manifest's digest and the
    shard files' sizes (their SHA-256 with `rehash`), not image by image."""
    from finetune_cli.data import records

    folder = rec["records"].get("folder")
    manifest, digest = records.read_manifest(folder)
    if digest != rec["records"].get("manifest_sha256"):
        raise DataError(
            f"{records.join(folder, records.MANIFEST)} changed since the run "
            f"recorded it in {Path(run_dir) / FILE}: the shards were packed "
            "again, so the run's held-out split may not be the same images. "
            "Restore the pack, or judge the model on other images with --data"
        )
    problems = records.check_shards(folder, manifest, rehash=rehash)
    if problems:
        raise DataError(
            f"{len(problems)} shard(s) of {folder} differ from its manifest: "
            + "; ".join(problems[:5])
            + ". Restore them, or pack the data again and start a new run"
        )
    index = records.index_records(folder)
    if splits is not None:
        index.splits = {s: v for s, v in index.splits.items() if s in splits}
    return index


def _check(path: str, digest: str, entry=None) -> Optional[str]:
    if not os.path.isfile(path):
        return "no longer exists"
    if preflight_lib.cached_digest(path, entry) == digest:
        return None
    if preflight_lib.sha256_file(path) != digest:
        return "content changed since the run recorded it"
    return None


def digests_of(run_dir, splits) -> set[str]:
    """Content hashes of a run's recorded files in `splits` (unchecked)."""
    rec = read(run_dir)
    if rec is None:
        return set()
    if rec.get("records"):
        from finetune_cli.data import records

        index = records.index_records(rec["records"]["folder"])
        keys = [k for s in splits for k, _ in index.splits.get(s, [])]
        return set(records.key_digests(keys).values()) if keys else set()
    return {d for s in splits for _, _, d in rec["files"].get(s, [])}


def unseen_by(reference_dir, files) -> list[int]:
    """Indices of `files` whose content the run (or promoted version) in
    `reference_dir` neither trained nor validated on; all of them when it
    recorded no split."""
    if reference_dir is None:
        return list(range(len(files)))
    from finetune_cli.data import records

    seen = digests_of(reference_dir, ("train", "val"))
    keyed = [f for f in files if records.is_key(f)]
    known = records.key_digests(keyed) if keyed else {}
    return [
        i
        for i, f in enumerate(files)
        if not seen or (known.get(f) or preflight_lib.sha256_file(f)) not in seen
    ]
