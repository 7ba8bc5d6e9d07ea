"""Batch inference on image files, streamed.

Images are decoded in a `tf.data` pipeline and predicted one batch at a
time, so memory stays flat however many files there are (only the list of
paths is held). Rows come out in the order of the input files; an
unreadable image gets a row with `error` set and no prediction, and the
others are still predicted.

Rows are written as they come: CSV (`file,label,confidence,top_k,error`,
top_k as `label:probability;...`) or JSON (a list of objects), to a file
(written to a temporary name and renamed when complete) or to stdout.

A multi-label model's row answers a label set: every label whose
probability is at or above its threshold (the run's `thresholds.json`, or
an export's metadata; 0.5 without). `label` holds them, in the order of
labels.txt, joined by `|` (empty
when none is above: the image shows none of the labels), JSON rows also
have them as a list under `labels`, and `confidence` is the top label's
probability.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Iterator, Optional

import os

import numpy as np
import tensorflow as tf

from finetune_cli.data import index as data_lib
from finetune_cli.data import pipeline
from finetune_cli.data import records
from finetune_cli import faults
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.files import atomic_path
from finetune_cli.model.saved import load_model
from finetune_cli.model.saved import model_image_size
from finetune_cli.model.saved import resolve_target

CSV_COLUMNS = ["file", "label", "confidence", "top_k", "error"]


IMAGE_EXTENSIONS = data_lib.IMAGE_EXTENSIONS


def collect_images(inputs, not_images: list | None = None) -> list[str]:
    """Image files from paths and folders (recursively), in a stable order;
    a folder written by `pack` gives its records (keys `records:...`).

    Files in a folder whose extension is not an image's are left out and,
    when `not_images` is a list, appended to it (so the caller can say so).
    """
    files = []
    for item in inputs:
        p = Path(item)
        if records.is_pack(item):  # a pack: every record of every split
            index = records.index_records(item)
            files += [k for samples in index.splits.values() for k, _ in samples]
            continue
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file():
                    continue
                if f.suffix.lower() in data_lib.IMAGE_EXTENSIONS:
                    files.append(str(f))
                elif not_images is not None and not f.name.startswith("."):
                    not_images.append(str(f))
        elif p.is_file():
            files.append(str(p))
        else:
            raise DataError(f"not found: {p}")
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    return files


def _why_unreadable(path: str) -> str:
    bad = pipeline.find_unreadable([path], limit=1)
    return bad[0][1] if bad else "cannot decode"


TTA = ("none", "flip")


def iter_probabilities(
    model, paths, batch_size: int = 32, tta: str = "none"
) -> Iterator[tuple]:
    """(path, probabilities or None, error or None) for each path, in order.

    Decoding runs in parallel ahead of the model; one batch of images is in
    memory at a time. Files that fail to decode are dropped by the pipeline
    and reported here by name, with the reason. `tta="flip"` averages the
    probabilities of each image and its left-right mirror (test-time
    augmentation: two forward passes).
    """
    paths = [str(p) for p in paths]
    size = model_image_size(model)
    if paths and records.is_key(paths[0]):  # a split of data.records
        ds = records.keyed_dataset(paths, size)
    else:
        ds = tf.data.Dataset.from_tensor_slices(
            [pipeline.tf_path(p) for p in paths]
        ).map(
            lambda p: (p, pipeline.load_image(p, size)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)
    i = 0
    for names, images in ds:
        probs = np.asarray(model.predict_on_batch(images), dtype=np.float64)
        if tta == "flip":
            mirrored = model.predict_on_batch(tf.image.flip_left_right(images))
            probs = (probs + np.asarray(mirrored, dtype=np.float64)) / 2
        for name, p in zip(names.numpy(), probs, strict=True):
            name = os.fsdecode(name)
            # Decoding is deterministic, so a path equal to the next one
            # expected is that file; any expected before it failed.
            while paths[i] != name:
                yield paths[i], None, _why_unreadable(paths[i])
                i += 1
            yield name, p, None
            i += 1
    for path in paths[i:]:
        yield path, None, _why_unreadable(path)


def predict_files(model, paths, batch_size: int = 32, tta: str = "none") -> np.ndarray:
    """Probabilities for every file, [n, classes].

    Raises:
        DataError: files that could not be decoded, named with the reason.
    """
    probs, bad = [], []
    for path, p, error in iter_probabilities(model, paths, batch_size, tta):
        if error is not None:
            bad.append((path, error))
        else:
            probs.append(p)
    if bad:
        raise DataError(
            "image(s) could not be decoded: "
            + "; ".join(f"{p}: {why}" for p, why in bad[:5])
            + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        )
    return np.stack(probs) if probs else np.zeros((0, model.output_shape[-1]))


UNKNOWN = "unknown"


def predict(
    target_path, files, *, top_k=3, batch_size=32, tta="none", reject_below=None
) -> Iterator[dict]:
    """Rows of file, label, confidence, top_k (label and probability) and
    error, one per file, streamed. The model is loaded (and any error about
    it raised) before this returns; the rows come as they are iterated.

    A row whose top probability is below `reject_below` has the label
    `unknown` (and `rejected` true); `top_k` still lists the classes.
    None: the run's `calibration.reject_below` (none for a bare model);
    0: never."""
    from finetune_cli.model.build import is_multi_label

    target = resolve_target(target_path)
    model = load_model(target)
    if is_multi_label(model):
        if reject_below:
            raise ConfigError(
                "--reject-below: a multi-label model answers each label at its "
                "own threshold (an image of none of the labels gets an empty "
                f"set). Received: --reject-below {reject_below}"
            )
        from finetune_cli.evaluate import labelsets

        th, _ = labelsets.for_target(target)
        return _label_set_rows(target, model, files, top_k, batch_size, tta, th)
    if reject_below is None:
        reject_below = run_reject_below(target)
    return _rows(target, model, files, top_k, batch_size, tta, reject_below or 0.0)


def _label_set_rows(target, model, files, top_k, batch_size, tta, th):
    names = target.labels
    k = min(top_k, len(names))
    for path, p, error in iter_probabilities(model, files, batch_size, tta):
        if error is not None:
            yield _error_row(path, error)
            continue
        order = np.argsort(-p, kind="stable")
        # In the model's label order, as evaluate's predictions.csv has them.
        chosen = [name for i, name in enumerate(names) if p[i] >= th[i]]
        yield {
            "file": path,
            "label": "|".join(chosen),
            "labels": chosen,
            "rejected": False,
            "confidence": float(p[order[0]]),
            "top_k": [
                {
                    "label": names[int(i)],
                    "probability": float(p[i]),
                    "threshold": float(th[i]),
                }
                for i in order[:k]
            ],
            "error": None,
        }


def _error_row(path, error) -> dict:
    return {
        "file": path,
        "label": None,
        "rejected": False,
        "confidence": None,
        "top_k": [],
        "error": error,
    }


def run_reject_below(target) -> Optional[float]:
    """The threshold a run's config sets (`calibration.reject_below`)."""
    if target.run_dir is None or not (target.run_dir / "config.yaml").is_file():
        return None
    from finetune_cli.config import load_run_config

    return load_run_config(target.run_dir).calibration.reject_below


def _rows(target, model, files, top_k, batch_size, tta, reject) -> Iterator[dict]:
    k = min(top_k, len(target.labels))
    for path, p, error in iter_probabilities(model, files, batch_size, tta):
        if error is not None:
            yield _error_row(path, error)
            continue
        top = np.argsort(-p, kind="stable")[:k]
        rejected = bool(p[top[0]] < reject)
        yield {
            "file": path,
            "label": UNKNOWN if rejected else target.labels[int(top[0])],
            "rejected": rejected,
            "confidence": float(p[top[0]]),
            "top_k": [
                {"label": target.labels[int(i)], "probability": float(p[i])}
                for i in top
            ],
            "error": None,
        }


class _CsvRows:
    def __init__(self, f):
        self._w = csv.writer(f, lineterminator="\n")
        self._w.writerow(CSV_COLUMNS)

    def write(self, r: dict) -> None:
        self._w.writerow(
            [
                r["file"],
                r["label"] or "",
                "" if r["confidence"] is None else f"{r['confidence']:.6f}",
                ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r["top_k"]),
                r["error"] or "",
            ]
        )

    def close(self) -> None:
        pass


class _JsonRows:
    def __init__(self, f):
        self._f = f
        self._n = 0
        f.write("[")

    def write(self, r: dict) -> None:
        self._f.write(("," if self._n else "") + "\n  " + json.dumps(r))
        self._n += 1

    def close(self) -> None:
        self._f.write("\n]\n" if self._n else "]\n")


def write_rows(rows, out, fmt: str) -> Iterator[dict]:
    """Write `rows` to `out` (a path, or `-` for stdout) as they come, passing
    each row on. A file appears only once complete."""
    writer_cls = _CsvRows if fmt == "csv" else _JsonRows
    if str(out) == "-":
        writer = writer_cls(sys.stdout)
        for r in rows:
            writer.write(r)
            yield r
        writer.close()
        sys.stdout.flush()
        return
    with atomic_path(Path(out)) as tmp:
        with open(
            tmp, "w", encoding="utf-8", errors="surrogateescape", newline=""
        ) as f:
            writer = writer_cls(f)
            for r in rows:
                writer.write(r)
                faults.point("predict_row")
                yield r
            writer.close()
