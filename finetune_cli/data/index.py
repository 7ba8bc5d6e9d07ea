"""The data index: find the images and split them (no TensorFlow here; the
pre-flight check is `preflight.py`, the tf.data pipeline `pipeline.py`).

Two layouts are understood (`data.dir` or `data.csv`):

- a folder per class, either directly (`flowers/roses/*.jpg`, split by the
  stratified fractions in `data.split` with `experiment.seed`) or under
  `train/`, `val/` and optionally `test/`;
- a CSV manifest with a `path,label` header (and optionally `split`), paths
  relative to the CSV's folder.

Class names are sorted folder names or sorted labels; their order is the
model's output order and is written to `labels.txt`. Images may be JPEG, PNG,
BMP or GIF (first frame); grayscale and RGBA images are converted to RGB.
Indexing uses only the file system and Pillow, so the CLI can check a
config's data before TensorFlow loads.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
from pathlib import Path

from finetune_cli.errors import relative_note
from finetune_cli.errors import DataError


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class DataIndex:
    """Every image of the experiment, by split, with integer labels."""

    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    source: str
    # SHA-256 of each file's bytes, filled in by `preflight` (path -> hex).
    digests: dict[str, str] = dataclasses.field(default_factory=dict)
    # The share of the data kept (`data.fraction`); 1.0 is all of it.
    fraction: float = 1.0

    def counts(self, split: str) -> list[int]:
        counts = [0] * len(self.class_names)
        for _, label in self.splits.get(split, []):
            counts[label] += 1
        return counts

    def files(self, split: str) -> list[str]:
        return [path for path, _ in self.splits.get(split, [])]

    def labels(self, split: str) -> list[int]:
        return [label for _, label in self.splits.get(split, [])]


def index_data(data, seed: int) -> DataIndex:
    """Find and split the images declared by a `data` config section.

    Raises:
        DataError: naming the folder, CSV row or class at fault.
    """
    index = (
        _index_csv(data, seed) if data.csv is not None else _index_folders(data, seed)
    )
    fraction = getattr(data, "fraction", 1.0)
    return index if fraction >= 1 else keep_fraction(index, fraction, seed)


def keep_fraction(index: DataIndex, fraction: float, seed: int) -> DataIndex:
    """`fraction` of every class of every split (at least one image of a
    class that has any), drawn with `seed`, in the split's order."""
    rng = random.Random(f"fraction-{seed}")
    splits = {}
    for split, samples in index.splits.items():
        by_class: dict[int, list[int]] = {}
        for i, (_, label) in enumerate(samples):
            by_class.setdefault(label, []).append(i)
        keep = set()
        for label in sorted(by_class):
            members = by_class[label]
            n = max(1, round(len(members) * fraction))
            keep.update(rng.sample(members, n))
        splits[split] = [s for i, s in enumerate(samples) if i in keep]
    return dataclasses.replace(index, splits=splits, fraction=fraction)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _class_files(folder: Path, key: str) -> list[Path]:
    """Every image in a class folder, subfolders included (they belong to
    the class); hidden files and folders are left out.

    Links are followed (a data folder may be assembled from links to other
    disks), but a link back into a folder already on the way (a loop: to
    the class folder, the data folder or one above) is an error naming it.
    """
    _check_name(folder, key)
    files, strays = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if any(os.path.realpath(p) == real for p in here.parents):
            raise DataError(
                f"{key}: {here} is a link back to {real}, a folder it lies "
                "in (a symlink loop); remove the link"
            )
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            (files if _is_image(p) else strays).append(p)
    if strays:
        shown = ", ".join(str(p) for p in strays[:3])
        more = f" and {len(strays) - 3} more" if len(strays) > 3 else ""
        raise DataError(
            f"{key}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"
            f" in a class folder: {shown}{more}"
        )
    return sorted(files)


def _check_name(folder: Path, key: str) -> None:
    """A class name must survive labels.txt (one per line) and JSON."""
    name = folder.name
    bad = any(c in name for c in "\n\r\t") or name != name.strip()
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        bad = True
    if bad:
        raise DataError(
            f"{key}: class folder {os.fsencode(folder)!r}: a class name must be "
            "UTF-8 text without line breaks, tabs or surrounding spaces "
            "(it is written one per line in labels.txt); rename the folder"
        )


def _class_dirs(root: Path) -> list[Path]:
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def _index_folders(data, seed: int) -> DataIndex:
    root = Path(data.dir)
    if not root.is_dir():
        raise DataError(f"data.dir: folder not found: {root}{relative_note(root)}")
    subdirs = {p.name for p in _class_dirs(root)}
    if "train" in subdirs:
        return _index_split_folders(root, subdirs)
    per_class = folder_classes(root, "data.dir")
    return _split_stratified(per_class, data.split, seed, str(root))


def folder_classes(root: Path, key: str) -> dict[str, list[str]]:
    """Image files per class folder of `root` (sorted names and files).

    Raises:
        DataError: no class folders, an empty class, or a non-image file,
            naming `key`.
    """
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise DataError(
            f"{key}: {root} has no class folders; expected one folder per "
            "class (or train/, val/, test/ folders of class folders)"
        )
    per_class = {}
    for d in class_dirs:
        files = _class_files(d, key)
        if not files:
            raise DataError(f"{key}: class {d.name!r} has no images: {d}")
        per_class[d.name] = [str(f) for f in files]
    return per_class


def index_whole_folder(root, key: str) -> DataIndex:
    """Every image of a folder of class folders as one split, "all"."""
    per_class = folder_classes(Path(root), key)
    names = sorted(per_class)
    samples = [(p, i) for i, c in enumerate(names) for p in per_class[c]]
    return DataIndex(names, {"all": samples}, str(root))


def _index_split_folders(root: Path, subdirs: set[str]) -> DataIndex:
    if "val" not in subdirs:
        raise DataError(
            f"data.dir: {root} has train/ but no val/ folder; add val/ (and "
            "optionally test/), or put class folders directly in data.dir to "
            "split by data.split"
        )
    class_names = [d.name for d in _class_dirs(root / "train")]
    if not class_names:
        raise DataError(f"data.dir: {root / 'train'} has no class folders")
    splits = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        samples = []
        for d in _class_dirs(folder):
            if d.name not in class_names:
                raise DataError(
                    f"data.dir: class {d.name!r} is in {split}/ but not in "
                    f"train/; classes in train/: {', '.join(class_names)}"
                )
            files = _class_files(d, "data.dir")
            if split == "train" and not files:
                raise DataError(f"data.dir: class {d.name!r} has no images: {d}")
            samples += [(str(f), class_names.index(d.name)) for f in files]
        splits[split] = samples
    return DataIndex(class_names, splits, str(root))


def _split_stratified(per_class: dict[str, list[str]], split, seed, source):
    """Split each class by the fractions; the same seed gives the same split."""
    class_names = sorted(per_class)
    splits = {s: [] for s in SPLITS}
    for label, name in enumerate(class_names):
        files = sorted(per_class[name])
        # A per-class RNG: adding images to one class leaves the others' split.
        random.Random(f"{seed}:{name}").shuffle(files)
        n = len(files)
        n_val = max(1, round(n * split.val))
        n_test = max(1, round(n * split.test)) if split.test > 0 else 0
        if n - n_val - n_test < 1:
            need = 2 + (split.test > 0)
            raise DataError(
                f"class {name!r} has {n} image(s); splitting it into train, "
                f"val{' and test' if split.test > 0 else ''} needs at least "
                f"{need}"
            )
        parts = {
            "val": files[:n_val],
            "test": files[n_val : n_val + n_test],
            "train": files[n_val + n_test :],
        }
        for s, paths in parts.items():
            splits[s] += [(p, label) for p in paths]
    if not splits["test"]:
        del splits["test"]
    return DataIndex(class_names, splits, source)


def _index_csv(data, seed: int) -> DataIndex:
    csv_path = Path(data.csv)
    if not csv_path.is_file():
        raise DataError(
            f"data.csv: file not found: {csv_path}{relative_note(csv_path)}"
        )
    root = csv_path.parent.resolve()
    try:
        # utf-8-sig: spreadsheet programs start CSV files with a BOM.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = rows and list(rows[0]) or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"data.csv: cannot read {csv_path}: {e}") from None
    if not rows:
        raise DataError(f"data.csv: {csv_path} has no rows")
    if "path" not in header or "label" not in header:
        raise DataError(
            f"data.csv: {csv_path} needs a header with `path` and `label` "
            f"(optionally `split`). Received: {header}"
        )
    has_split = "split" in header
    per_class: dict[str, list[str]] = {}
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise DataError(f"data.csv: {csv_path} line {i}: empty path or label")
        path = (root / rel).resolve()
        if not data.allow_outside_root and not path.is_relative_to(root):
            raise DataError(
                f"data.csv: {csv_path} line {i}: {rel!r} points outside the "
                f"CSV's folder {root} (set data.allow_outside_root: true to "
                "allow it)"
            )
        if not path.is_file():
            raise DataError(f"data.csv: {csv_path} line {i}: file not found: {rel}")
        if not _is_image(path):
            raise DataError(
                f"data.csv: {csv_path} line {i}: not an image file (expected "
                f"{', '.join(IMAGE_EXTENSIONS)}): {rel}"
            )
        if has_split:
            split = (row.get("split") or "").strip()
            if split not in SPLITS:
                raise DataError(
                    f"data.csv: {csv_path} line {i}: split must be one of "
                    f"{', '.join(SPLITS)}. Received: {split!r}"
                )
            by_split[split].append((str(path), label))
        else:
            per_class.setdefault(label, []).append(str(path))
    _check_label_spellings(rows, csv_path)
    if not has_split:
        return _split_stratified(per_class, data.split, seed, str(csv_path))
    class_names = sorted({label for label in (lb for _, lb in by_split["train"])})
    if not by_split["train"] or not by_split["val"]:
        raise DataError(
            f"data.csv: {csv_path} has a split column but no "
            f"{'train' if not by_split['train'] else 'val'} rows"
        )
    splits = {}
    for split, items in by_split.items():
        unknown = sorted({lb for _, lb in items} - set(class_names))
        if unknown:
            raise DataError(
                f"data.csv: {csv_path}: labels {unknown} appear in {split} "
                "rows but not in train rows"
            )
        if items:
            splits[split] = [(p, class_names.index(lb)) for p, lb in items]
    return DataIndex(class_names, splits, str(csv_path))


def _check_label_spellings(rows, csv_path) -> None:
    """Labels that differ only in case are a typo, not two classes."""
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows, start=2):
        label = (row.get("label") or "").strip()
        other = first.setdefault(label.casefold(), (label, i))
        if other[0] != label:
            raise DataError(
                f"data.csv: {csv_path} line {i}: label {label!r} differs from "
                f"{other[0]!r} (line {other[1]}) only in case; use one "
                "spelling for one class"
            )
