"""The CSV manifest (`data.csv`): a `path,label` header, optionally
`split`, paths relative to the CSV's folder (`data.allow_outside_root` for
others). Single-label: one class name a row. `task: multi_label`: the
label cell holds the image's labels joined by `data.label_separator`
(`multilabel.py`), and may be empty. Labels that differ only in case are
refused as a typo. No TensorFlow here.
"""

from __future__ import annotations

import csv
from pathlib import Path

from finetune_cli.data import samples
from finetune_cli.data import multilabel
from finetune_cli.errors import DataError
from finetune_cli.errors import relative_note


def _read_csv(data, *, empty_label_ok: bool = False):
    """The rows of `data.csv`: [(line, absolute path, label cell, split or
    None)], every path checked, and the CSV's path.

    Raises:
        DataError: naming the CSV and line at fault.
    """
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
    out = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or (not label and not empty_label_ok):
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
        if not samples.is_image(path):
            raise DataError(
                f"data.csv: {csv_path} line {i}: not an image file (expected "
                f"{', '.join(samples.IMAGE_EXTENSIONS)}): {rel}"
            )
        split = None
        if has_split:
            split = (row.get("split") or "").strip()
            if split not in samples.SPLITS:
                raise DataError(
                    f"data.csv: {csv_path} line {i}: split must be one of "
                    f"{', '.join(samples.SPLITS)}. Received: {split!r}"
                )
        out.append((i, str(path), label, split))
    if has_split:
        for s in ("train", "val"):
            if not any(r[3] == s for r in out):
                raise DataError(
                    f"data.csv: {csv_path} has a split column but no {s} rows"
                )
    return out, csv_path


def index_csv(data, seed: int) -> samples.DataIndex:
    rows, csv_path = _read_csv(data)
    _check_label_spellings([(i, label) for i, _, label, _ in rows], csv_path)
    if rows[0][3] is None:
        per_class: dict[str, list[str]] = {}
        for _, path, label, _ in rows:
            per_class.setdefault(label, []).append(path)
        return samples.split_stratified(per_class, data.split, seed, str(csv_path))
    class_names = sorted({label for _, _, label, s in rows if s == "train"})
    splits: dict[str, list] = {}
    for _, path, label, split in rows:
        if label not in class_names:
            raise DataError(
                f"data.csv: {csv_path}: label {label!r} appears in {split} "
                "rows but not in train rows"
            )
        splits.setdefault(split, []).append((path, class_names.index(label)))
    return samples.DataIndex(class_names, _in_order(splits), str(csv_path))


def index_multi_label(data, seed: int) -> samples.DataIndex:
    """A multi-label CSV: label cells are sets (`multilabel.parse_cell`)."""
    rows, csv_path = _read_csv(data, empty_label_ok=True)
    sep = data.label_separator
    parsed = [(i, p, multilabel.parse_cell(lb, sep), s) for i, p, lb, s in rows]
    _check_label_spellings(
        [(i, name) for i, _, names, _ in parsed for name in names], csv_path
    )
    for i, _, names, _ in parsed:
        bad = [n for n in names if any(c in n for c in "\n\r\t")]
        if bad:
            raise DataError(
                f"data.csv: {csv_path} line {i}: label {bad[0]!r} holds a line "
                "break or tab (labels are written one per line in labels.txt)"
            )
    split_given = parsed[0][3] is not None
    train_rows = [r for r in parsed if r[3] == "train"] if split_given else parsed
    class_names = sorted({n for _, _, names, _ in train_rows for n in names})
    if not class_names:
        raise DataError(
            f"data.csv: {csv_path}: no labels in the training rows (label cells "
            f"split on data.label_separator {sep!r})"
        )
    if parsed[0][3] is None:
        splits = multilabel.stratified_split(
            [(p, names) for _, p, names, _ in parsed],
            class_names,
            data.split,
            seed,
            str(csv_path),
        )
        if not splits.get("test"):
            splits.pop("test", None)
        return samples.DataIndex(class_names, splits, str(csv_path), multi_label=True)
    splits = {}
    for i, path, names, split in parsed:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise DataError(
                f"data.csv: {csv_path} line {i}: labels {unknown} appear in "
                f"{split} rows but not in train rows"
            )
        labels = tuple(sorted(class_names.index(n) for n in names))
        splits.setdefault(split, []).append((path, labels))
    return samples.DataIndex(
        class_names, _in_order(splits), str(csv_path), multi_label=True
    )


def _in_order(splits: dict) -> dict:
    """Splits in the order train, val, test."""
    return {s: splits[s] for s in samples.SPLITS if s in splits}


def _check_label_spellings(labels, csv_path) -> None:
    """Labels ([(line, label)]) that differ only in case are a typo, not
    two classes."""
    first: dict[str, tuple[str, int]] = {}
    for i, label in labels:
        other = first.setdefault(label.casefold(), (label, i))
        if other[0] != label:
            raise DataError(
                f"data.csv: {csv_path} line {i}: label {label!r} differs from "
                f"{other[0]!r} (line {other[1]}) only in case; use one "
                "spelling for one class"
            )
