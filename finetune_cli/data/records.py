"""Sharded records: a data set as TFRecord shards and a manifest.

`finetune-cli pack DATA --out SHARDS` writes, per split, shards of
`tf.train.Example`s (`<split>-00000.tfrecord`, ...) and `manifest.json`:

    {"format": "finetune-cli-records/1", "task": "single_label",
     "classes": [...], "source": "data/flowers",
     "splits": {"train": {"images": 2351, "per_class": {...}}, ...},
     "shards": [{"file": "train-00000.tfrecord", "split": "train",
                 "images": 1024, "bytes": ..., "sha256": "...",
                 "labels": [3, 0, ...]}, ...],
     "skipped": [[path, why], ...]}

The labels are in the manifest too (a class index per image, or a list for
a multi-label set), so indexing a pack reads the manifest, not the shards.

Each example holds `image` (the file's encoded bytes, as they were),
`labels` (int64 class indices: one, or a multi-label set), `sha256` (of the
image bytes), `split` and `path` (where it came from). Every image passed
the pre-flight check when packed, so training from shards decodes nothing
twice. `data.records: SHARDS` trains, evaluates and extracts from them.

Within the tool a record is named by a key, `records:<shard path>#<n>` (the
n-th example of that shard), and a split of a records index is a
`RecordSamples`: the (key, label) list plus the shard files it reads.
`pipeline.make_dataset` reads those shards with interleaved parallel
reads; under `tf.distribute` each input pipeline reads its own shards of
every epoch (file-level sharding). A run on shards records the manifest's
SHA-256 in `split.json` instead of every file; resume and evaluate check
the manifest and the shard files' sizes (`data.rehash`: their SHA-256),
not every image.

Paths go through `tf.io.gfile`, so SHARDS may be `gs://bucket/shards`
(TensorFlow's GCS filesystem) or any scheme TensorFlow registers.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
from typing import Optional

import tensorflow as tf

from finetune_cli import remote
from finetune_cli.data import samples as samples_lib
from finetune_cli.data.decode import load_pixels
from finetune_cli.errors import DataError

FORMAT = "finetune-cli-records/1"
MANIFEST = "manifest.json"
PREFIX = "records:"


class RecordSamples(list):
    """A split read from shards: (key, label) pairs in shard order, and the
    shard files (`shards`) that hold them."""

    def __init__(self, items, shards, digest: str):
        super().__init__(items)
        self.shards = list(shards)
        self.digest = digest  # the manifest's SHA-256

    def __add__(self, other):
        """Two splits of one pack (train + val): still records of it."""
        if getattr(other, "digest", None) != self.digest:
            return list(self) + list(other)
        return RecordSamples(
            list(self) + list(other), self.shards + other.shards, self.digest
        )


def join(folder, name: str) -> str:
    folder = str(folder)
    return posixpath.join(folder, name) if "://" in folder else f"{folder}/{name}"


def is_pack(folder) -> bool:
    """Whether `folder` holds a pack (its `manifest.json`)."""
    if "://" not in str(folder):  # a local name may not be UTF-8: os knows it
        return os.path.isfile(os.path.join(folder, MANIFEST))
    return tf.io.gfile.exists(join(folder, MANIFEST))


def is_key(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def key(shard: str, n: int) -> str:
    return f"{PREFIX}{shard}#{n}"


def parse_key(k: str) -> tuple[str, int]:
    shard, _, n = k[len(PREFIX) :].rpartition("#")
    return shard, int(n)


# -- writing -----------------------------------------------------------------


def _example(raw: bytes, labels, split: str, path: str, digest: str) -> bytes:
    f = tf.train.Feature
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": f(bytes_list=tf.train.BytesList(value=[raw])),
                "labels": f(int64_list=tf.train.Int64List(value=list(labels))),
                "sha256": f(bytes_list=tf.train.BytesList(value=[digest.encode()])),
                "split": f(bytes_list=tf.train.BytesList(value=[split.encode()])),
                "path": f(bytes_list=tf.train.BytesList(value=[path.encode()])),
            }
        )
    ).SerializeToString()


def pack(index, out_dir, *, shard_size: int = 1024, skipped=(), progress=None) -> dict:
    """Write `index` (pre-flight checked) as shards and a manifest into
    `out_dir` (a new folder, local or remote). Returns the manifest.

    Shards are written under temporary names and renamed; the manifest is
    written last, so a folder without `manifest.json` is an unfinished pack.
    """
    gfile = tf.io.gfile
    gfile.makedirs(str(out_dir))
    shards, done = [], 0
    total = sum(len(v) for v in index.splits.values())
    for split, items in index.splits.items():
        # Mixed before sharding: a shard holds every class, not one.
        items = list(items)
        random.Random(f"pack:{split}").shuffle(items)
        for s, start in enumerate(range(0, len(items), shard_size)):
            part = items[start : start + shard_size]
            name = f"{split}-{s:05d}.tfrecord"
            final = join(out_dir, name)
            with tf.io.TFRecordWriter(final + ".partial") as w:
                for path, label in part:
                    with gfile.GFile(path, "rb") as f:
                        raw = f.read()
                    labels = label if isinstance(label, tuple) else (label,)
                    # The pre-flight hashed every file already.
                    digest = index.digests.get(path) or hashlib.sha256(raw).hexdigest()
                    w.write(_example(raw, labels, split, path, digest))
                    done += 1
                    if progress is not None:
                        progress(done, total)
            gfile.rename(final + ".partial", final, overwrite=True)
            shards.append(
                {
                    "file": name,
                    "split": split,
                    "images": len(part),
                    "bytes": gfile.stat(final).length,
                    "sha256": file_sha256(final),
                    # The labels in shard order: indexing a pack reads the
                    # manifest alone, not the image bytes.
                    "labels": [
                        list(lb) if isinstance(lb, tuple) else lb for _, lb in part
                    ],
                }
            )
    manifest = {
        "format": FORMAT,
        "task": "multi_label" if index.multi_label else "single_label",
        "classes": list(index.class_names),
        "source": index.source,
        "splits": index.per_split("images"),
        "shards": shards,
        "skipped": [list(x) for x in skipped],
    }
    remote.write_text(join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def file_sha256(path: str) -> str:
    """The SHA-256 of a (local or remote) file's bytes."""
    h = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -- reading -----------------------------------------------------------------


def read_manifest(folder) -> tuple[dict, str]:
    """(manifest, its SHA-256).

    Raises:
        DataError: no manifest (not a pack, or an unfinished one), or not
            one of ours.
    """
    path = join(folder, MANIFEST)
    if not tf.io.gfile.exists(path):
        raise DataError(
            f"data.records: {folder} has no {MANIFEST}: not a folder written "
            "by `finetune-cli pack`, or a pack that did not finish; pack again"
        )
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(
            f"data.records: {path} is not a manifest of format {FORMAT!r}; "
            "pack the data again"
        )
    return manifest, hashlib.sha256(raw).hexdigest()


def index_records(folder, *, multi_label: Optional[bool] = None):
    """The DataIndex of a pack: each split a `RecordSamples`.

    Raises:
        DataError: a missing manifest, or a task other than `multi_label`
            asks for.
    """
    if "://" not in str(folder):  # keys and run records outlive the cwd
        folder = os.path.abspath(folder)
    manifest, digest = read_manifest(folder)
    multi = manifest.get("task") == "multi_label"
    if multi_label is not None and multi != multi_label:
        raise DataError(
            f"data.records: {folder} was packed as {manifest.get('task')}; the "
            f"config's task is {'multi_label' if multi_label else 'single_label'}"
        )
    labels = _read_labels(folder, manifest)
    splits = {}
    for split in manifest["splits"]:
        shards = [s for s in manifest["shards"] if s["split"] == split]
        items = []
        for s in shards:
            path = join(folder, s["file"])
            for n, lb in enumerate(labels[s["file"]]):
                items.append((key(path, n), tuple(lb) if multi else lb[0]))
        splits[split] = RecordSamples(
            items, [join(folder, s["file"]) for s in shards], digest
        )
    return samples_lib.DataIndex(
        list(manifest["classes"]),
        splits,
        str(folder),
        multi_label=multi,
        records={"folder": str(folder), "manifest_sha256": digest},
    )


def _read_labels(folder, manifest) -> dict:
    """Every shard's labels in order, as lists (from the manifest)."""
    out = {}
    for s in manifest["shards"]:
        labels = s.get("labels")
        if not isinstance(labels, list):
            raise DataError(
                f"data.records: {join(folder, MANIFEST)} lists no labels for "
                f"{s.get('file')}; pack the data again"
            )
        out[s["file"]] = [lb if isinstance(lb, list) else [lb] for lb in labels]
        if len(out[s["file"]]) != s["images"]:
            raise DataError(
                f"data.records: {join(folder, s['file'])} holds "
                f"{len(out[s['file']])} examples, the manifest says "
                f"{s['images']}; pack the data again"
            )
    return out


def check_shards(folder, manifest, *, rehash: bool = False) -> list[str]:
    """What is wrong with the shard files against the manifest: missing,
    another size, or (with `rehash`) another SHA-256."""
    problems = []
    for s in manifest["shards"]:
        path = join(folder, s["file"])
        if not tf.io.gfile.exists(path):
            problems.append(f"{path}: missing")
            continue
        if tf.io.gfile.stat(path).length != s["bytes"]:
            problems.append(f"{path}: size changed")
            continue
        if rehash and file_sha256(path) != s["sha256"]:
            problems.append(f"{path}: content changed")
    return problems


_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "labels": tf.io.VarLenFeature(tf.int64),
}


def parse(record, num_classes: int):
    """(encoded image bytes, target row: one-hot, or multi-hot for a set)."""
    ex = tf.io.parse_single_example(record, _SPEC)
    ids = tf.sparse.to_dense(ex["labels"])
    row = tf.reduce_sum(tf.one_hot(ids, num_classes), axis=0)
    return ex["image"], tf.minimum(row, 1.0)


def examples(samples: RecordSamples, *, files=None, parallel: bool = True):
    """Serialized examples of `files` (a dataset of shard paths; default:
    every shard of the split), shard after shard in order, or interleaved
    in parallel (`parallel`: a fixed cycle of 8 shards, so the order is the
    same on every machine)."""
    if files is None:
        files = tf.data.Dataset.from_tensor_slices(samples.shards)
    if not parallel:
        return files.flat_map(tf.data.TFRecordDataset)
    return files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=max(1, min(8, len(samples.shards))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def keyed_dataset(keys, image_size):
    """(key, float pixels) for record `keys`, in the order of their shards'
    first appearance in `keys` and of the examples within a shard: each
    shard is read once and only the named examples are decoded."""
    shards = list(dict.fromkeys(parse_key(k)[0] for k in keys))
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(keys)), tf.ones(len(keys), tf.int32)
        ),
        default_value=0,
    )

    def keyed(shard):
        return (
            tf.data.TFRecordDataset(shard)
            .enumerate()
            .map(
                lambda n, r: (
                    tf.strings.join([PREFIX, shard, "#", tf.strings.as_string(n)]),
                    r,
                )
            )
        )

    size = tuple(image_size)
    return (
        tf.data.Dataset.from_tensor_slices(shards)
        .flat_map(keyed)
        .filter(lambda k, r: table.lookup(k) > 0)
        .map(
            lambda k, r: (k, load_pixels(parse(r, 1)[0], size)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    )


def keyed_images(keys, image_size) -> dict:
    """{key: float pixels [H, W, 3]} of `keys` (a few hundred: the export's
    parity images)."""
    return {
        k.decode(): px for k, px in keyed_dataset(keys, image_size).as_numpy_iterator()
    }


def key_digests(keys) -> dict:
    """{key: SHA-256 of the image bytes} of record `keys`."""
    spec = {"sha256": tf.io.FixedLenFeature([], tf.string)}
    wanted = set(keys)
    out = {}
    for shard in dict.fromkeys(parse_key(k)[0] for k in keys):
        ds = tf.data.TFRecordDataset(shard).map(
            lambda r: tf.io.parse_single_example(r, spec)["sha256"]
        )
        for n, digest in enumerate(ds.as_numpy_iterator()):
            k = key(shard, n)
            if k in wanted:
                out[k] = digest.decode()
    return out
