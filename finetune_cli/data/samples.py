"""The data index record (`DataIndex`: every image by split, with its
labels) and the stratified split of class folders. No TensorFlow here;
`index.py` finds the images, `manifest.py` reads a CSV.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Optional

from finetune_cli.errors import DataError


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class DataIndex:
    """Every image of the experiment, by split, with integer labels (a
    tuple of them per image for a multi-label index)."""

    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    source: str
    # SHA-256 of each file's bytes, filled in by `preflight` (path -> hex).
    digests: dict[str, str] = dataclasses.field(default_factory=dict)
    # The share of the data kept (`data.fraction`); 1.0 is all of it.
    fraction: float = 1.0
    # task: multi_label: each label is a tuple of class indices.
    multi_label: bool = False
    # data.records: {"folder", "manifest_sha256"}; each split is a
    # `records.RecordSamples` of record keys (`records.py`).
    records: Optional[dict] = None

    def counts(self, split: str) -> list[int]:
        """Images per class (per label: the images carrying it)."""
        counts = [0] * len(self.class_names)
        for _, label in self.splits.get(split, []):
            for i in label if isinstance(label, tuple) else (label,):
                counts[i] += 1
        return counts

    def per_split(self, count: str = "files") -> dict:
        """{split: {count: images, "per_class": {class: images}}}, as
        split.json and a pack's manifest record them."""
        return {
            s: {
                count: len(v),
                "per_class": dict(zip(self.class_names, self.counts(s), strict=True)),
            }
            for s, v in self.splits.items()
        }

    def label_name(self, label) -> str:
        """A label as written in a CSV: a class name, or names joined by
        `|` (an empty string for an image with no label)."""
        if isinstance(label, tuple):
            return "|".join(self.class_names[i] for i in label)
        return self.class_names[label]

    def files(self, split: str) -> list[str]:
        return [path for path, _ in self.splits.get(split, [])]

    def labels(self, split: str) -> list[int]:
        return [label for _, label in self.splits.get(split, [])]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def split_stratified(per_class: dict[str, list[str]], split, seed, source):
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
