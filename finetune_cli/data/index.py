"""The data index: find the images and split them (no TensorFlow here; the
pre-flight check is `preflight.py`, the tf.data pipeline `pipeline.py`).

Two layouts are understood (`data.dir` or `data.csv`):

- a folder per class, either directly (`flowers/roses/*.jpg`, split by the
  stratified fractions in `data.split` with `experiment.seed`) or under
  `train/`, `val/` and optionally `test/`;
- a CSV manifest with a `path,label` header (and optionally `split`), paths
  relative to the CSV's folder; with `task: multi_label` the label cell
  holds an image's labels joined by `data.label_separator` (`multilabel.py`).

Class names are sorted folder names or sorted labels; their order is the
model's output order and is written to `labels.txt`. Images may be JPEG, PNG,
BMP or GIF (first frame); grayscale and RGBA images are converted to RGB.
Indexing uses only the file system and Pillow, so the CLI can check a
config's data before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

from finetune_cli.data.samples import IMAGE_EXTENSIONS
from finetune_cli.data.samples import SPLITS
from finetune_cli.data.samples import DataIndex
from finetune_cli.data.samples import is_image
from finetune_cli.data.samples import split_stratified
from finetune_cli.errors import relative_note
from finetune_cli.errors import DataError


def index_config(cfg) -> DataIndex:
    """`index_data` of a whole config (its data, seed and task)."""
    return index_data(
        cfg.data, cfg.experiment.seed, multi_label=cfg.task == "multi_label"
    )


def index_data(data, seed: int, *, multi_label: bool = False) -> DataIndex:
    """Find and split the images declared by a `data` config section.

    `multi_label`: the CSV's label cells are label sets (`multilabel.py`).

    Raises:
        DataError: naming the folder, CSV row or class at fault.
    """
    from finetune_cli import remote
    from finetune_cli.data import manifest

    if remote.is_remote(data.dir):  # a local mirror of the folder
        data = data.model_copy(
            update={"dir": str(remote.pull(data.dir, remote.mirror_of(data.dir)))}
        )
    if remote.is_remote(data.csv):  # the CSV and the files it names
        data = data.model_copy(update={"csv": remote.pull_csv(data.csv)})
    if getattr(data, "records", None) is not None:
        from finetune_cli.data import records

        return records.index_records(data.records, multi_label=multi_label)
    if multi_label:
        index = manifest.index_multi_label(data, seed)
    elif data.csv is not None:
        index = manifest.index_csv(data, seed)
    else:
        index = _index_folders(data, seed)
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
            (files if is_image(p) else strays).append(p)
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
    return split_stratified(per_class, data.split, seed, str(root))


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
