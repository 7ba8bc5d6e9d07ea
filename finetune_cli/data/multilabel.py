"""Multi-label data (`task: multi_label`): label sets and their split.

An image's labels come from the `label` cell of `data.csv`, joined by
`data.label_separator` (default `|`: `cat|dog`); an empty cell is an image
with none of the labels (a negative for every one). Within the index a
multi-label sample is `(path, (i, j, ...))`, the sorted indices of its
labels, where a single-label sample is `(path, i)`.

Without a `split` column the images are split by iterative stratification
(Sechidis, Tsoumakas and Vlahavas, 2011): labels are taken rarest first,
and each image carrying the label goes to the split that still wants the
most of it, so every label lands in every split where it has images
enough. A label with fewer images than the splits is an error naming it.
No TensorFlow here.
"""

from __future__ import annotations

import random

import numpy as np

from finetune_cli.errors import DataError


def parse_cell(cell: str, separator: str) -> tuple[str, ...]:
    """The distinct labels of a CSV cell, in the order written."""
    parts = (p.strip() for p in (cell or "").split(separator))
    return tuple(dict.fromkeys(p for p in parts if p))


def is_multi(samples) -> bool:
    """Whether (path, label) samples carry label sets."""
    return bool(samples) and isinstance(samples[0][1], tuple)


def targets(labels, num_classes: int) -> np.ndarray:
    """Labels as float32 rows: one-hot for class indices, multi-hot for
    label sets (an empty set is a row of zeros)."""
    labels = list(labels)
    out = np.zeros((len(labels), num_classes), dtype="float32")
    for i, lb in enumerate(labels):
        out[i, list(lb) if isinstance(lb, tuple) else lb] = 1.0
    return out


def rows(labels, num_classes: int) -> np.ndarray:
    """float32 target rows from class indices [n] (one-hot) or from rows
    already [n, classes] (multi-hot, as `targets` gives)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype("float32")
    return np.eye(num_classes, dtype="float32")[labels]


def stratified_split(items, class_names, split, seed: int, source: str):
    """{"train", "val", "test"} -> [(path, label indices)] by iterative
    stratification of `items` ([(path, label names)]) with the fractions
    of `split` (a `data.split` section), deterministic in `seed`.

    Raises:
        DataError: a label with too few images to be in every split,
            named with its count.
    """
    fractions = {"train": split.train, "val": split.val, "test": split.test}
    names = [s for s, f in fractions.items() if f > 0]
    index_of = {c: i for i, c in enumerate(class_names)}
    rows = sorted(items)
    random.Random(f"{seed}:multi-label").shuffle(rows)
    label_sets = [tuple(sorted(index_of[c] for c in lbs)) for _, lbs in rows]
    per_label = [[] for _ in class_names]
    for r, lbs in enumerate(label_sets):
        for lb in lbs:
            per_label[lb].append(r)
    for lb, members in enumerate(per_label):
        if len(members) < len(names):
            raise DataError(
                f"data.csv: label {class_names[lb]!r} has {len(members)} "
                f"image(s); a stratified split into {', '.join(names)} needs "
                f"at least {len(names)} (one in each split). Add images of "
                "it, drop the label from the CSV, or give a `split` column"
            )
    # Per split, the images and, per label, the images it still wants.
    want_total = {s: fractions[s] * len(rows) for s in names}
    want = {s: [fractions[s] * len(m) for m in per_label] for s in names}
    have = {s: [0] * len(class_names) for s in names}
    where: dict[int, str] = {}

    def place(r: int, s: str) -> None:
        where[r] = s
        want_total[s] -= 1
        for lb in label_sets[r]:
            want[s][lb] -= 1
            have[s][lb] += 1

    for lb in sorted(range(len(class_names)), key=lambda i: (len(per_label[i]), i)):
        for r in per_label[lb]:
            if r in where:
                continue
            # A split without the label yet first (every label in every
            # split), then the one wanting it most, then the one wanting
            # most images overall, then the fixed order of `names`.
            s = max(
                names,
                key=lambda s: (
                    have[s][lb] == 0,
                    want[s][lb],
                    want_total[s],
                    -names.index(s),
                ),
            )
            place(r, s)
    for r in range(len(rows)):  # images with no label: by overall want
        if r not in where:
            place(r, max(names, key=lambda s: (want_total[s], -names.index(s))))
    out = {s: [] for s in names}
    for r, (path, _) in enumerate(rows):
        out[where[r]].append((path, label_sets[r]))
    for s in ("train", "val"):
        missing = [
            class_names[lb]
            for lb in range(len(class_names))
            if not any(lb in lbs for _, lbs in out[s])
        ]
        if missing:
            raise DataError(
                f"data.csv: labels {missing} have no image in the {s} split "
                f"after a stratified split of {source}; add images of them "
                "or give a `split` column"
            )
    for s in out:
        out[s].sort()
    return out
