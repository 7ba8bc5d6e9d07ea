"""The feature cache: the frozen base run once, its outputs kept on disk.

A frozen base gives the same features for the same image every epoch, so
training a head on a frozen base only needs one pass of the base. `extract`
writes those features; `finetune` reuses them for phases whose base is
frozen and that come before any phase that trains the base.

On-disk format, one folder per split (`<dir>/<split>/`):

- `manifest.json`: `format` ("finetune-cli-features/1"), `split`,
  `num_images`, `views` (augmented copies per image; 1 = none),
  `feature_dim`, `dtype` ("float32"), `class_names`, `shards` (file names
  in order), `key` (the content key below) and `key_fields` (what it hashes).
- `shard-00000.npz`, ...: NumPy archives with `features` [n, feature_dim]
  float32, `labels` [n] int64 (index into `class_names`), `paths` [n] str,
  `views` [n] int32 (which augmented view; 0 when not augmented).
  Row order is the data order, view-major when `views` > 1.

Read them with `numpy.load(shard)["features"]`; nothing of ours is needed.

The content key hashes the application, the weights (the file's SHA-256,
or "imagenet" with the Keras version, or "none" with the seed), input size,
pooling, preprocessing, constructor options, compute dtype, the
augmentation when views are cached, and every data file's path, size and
modification time. A cache is reused only when the key matches; otherwise
the reason is reported and the features are recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from finetune_cli.model import applications
from finetune_cli.data import index as data_lib
from finetune_cli.data import preflight as preflight_lib
from finetune_cli.data import pipeline
from finetune_cli import faults
from finetune_cli.run import folder as rundir
from finetune_cli.files import atomic_path
from finetune_cli.files import write_json

FORMAT = "finetune-cli-features/1"


def _weights_identity(cfg) -> str:
    w = cfg.model.weights
    if w == "imagenet":
        return f"imagenet (keras {keras.__version__})"
    if w == "none":
        return f"none (random, seed {cfg.experiment.seed})"
    return f"sha256:{preflight_lib.sha256_file(w)}"


def key_fields(
    cfg, samples, *, views: int = 1, augmentation=None, dtype: str = "float32"
) -> dict:
    """Everything the features depend on, as a JSON-able dict."""
    app = applications.get(cfg.model.name)
    files = []
    for path, _ in samples:
        st = os.stat(path)
        files.append([path, st.st_size, st.st_mtime_ns])
    return {
        "application": app.name,
        "weights": _weights_identity(cfg),
        "image_size": list(cfg.data.image_size),
        "pooling": cfg.model.pooling,
        "preprocess": app.preprocess,
        "options": cfg.model.options,
        "dtype": dtype,
        "views": views,
        "augmentation": (
            [a.model_dump(exclude_none=True) for a in augmentation]
            if views > 1 and augmentation
            else None
        ),
        "seed": cfg.experiment.seed if views > 1 else None,
        # A view's augmentation is drawn per batch (pipeline.reseed), so the
        # batch size decides which copy of an image a view holds.
        "augment_batch_size": cfg.data.batch_size if views > 1 else None,
        "files": files,
    }


def content_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def explain_mismatch(old: dict, new: dict) -> str:
    """Why a cache no longer fits, in words."""
    reasons = []
    for name in (
        "application",
        "weights",
        "image_size",
        "pooling",
        "preprocess",
        "options",
        "dtype",
        "views",
        "augmentation",
        "seed",
        "augment_batch_size",
        "derived_from",
    ):
        if old.get(name) != new.get(name):
            reasons.append(f"{name} changed ({old.get(name)} -> {new.get(name)})")
    old_files = {f[0]: f[1:] for f in old.get("files", [])}
    new_files = {f[0]: f[1:] for f in new.get("files", [])}
    added = sorted(set(new_files) - set(old_files))
    removed = sorted(set(old_files) - set(new_files))
    edited = sorted(
        p for p in set(old_files) & set(new_files) if old_files[p] != new_files[p]
    )
    for label, items in (("added", added), ("removed", removed), ("modified", edited)):
        if items:
            shown = ", ".join(Path(p).name for p in items[:3])
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            reasons.append(f"{len(items)} image(s) {label}: {shown}{more}")
    return "; ".join(reasons) or "the cache format changed"


@dataclasses.dataclass
class FeatureSet:
    """A split's cached features, as a manifest and shard files."""

    folder: Path
    manifest: dict

    @property
    def num_rows(self) -> int:
        return self.manifest["num_images"] * self.manifest["views"]

    def load(self):
        """(features [views, n, d], labels [n], paths [n]) in data order."""
        feats, labels, paths = [], [], []
        for shard in self.manifest["shards"]:
            with np.load(self.folder / shard) as z:
                feats.append(z["features"])
                labels.append(z["labels"])
                paths.append(z["paths"])
        v, n = self.manifest["views"], self.manifest["num_images"]
        f = np.concatenate(feats).reshape(v, n, -1)
        return (
            f,
            np.concatenate(labels)[:n],
            [str(p) for p in np.concatenate(paths)[:n]],
        )


def open_cache(folder, fields) -> tuple[Optional[FeatureSet], Optional[str]]:
    """The cached set when its key matches, else (None, why it was not used)."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None, "no cache yet"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None, "the manifest is unreadable"
    if manifest.get("format") != FORMAT:
        return None, "the cache format changed"
    if manifest.get("key") != content_key(fields):
        return None, explain_mismatch(manifest.get("key_fields", {}), fields)
    missing = [s for s in manifest["shards"] if not (folder / s).is_file()]
    if missing:
        return None, f"shard files are missing ({missing[0]})"
    return FeatureSet(folder, manifest), None


def build_extractor(cfg):
    """raw pixels -> preprocessing -> frozen base -> pooled features."""
    from finetune_cli.model import build as model_lib

    app = applications.get(cfg.model.name)
    h, w = cfg.data.image_size
    base = model_lib.build_base(cfg.model, (h, w))
    base.trainable = False
    return extractor_from(base, model_lib.build_preprocessing(app), (h, w))


def extractor_from(base, preprocess, image_size):
    h, w = image_size
    inputs = keras.Input((h, w, 3), dtype="float32")
    x = preprocess(inputs) if preprocess is not None else inputs
    return keras.Model(inputs, base(x, training=False), name="feature_extractor")


def extract(
    extractor,
    samples,
    class_names,
    folder,
    fields,
    *,
    image_size,
    batch_size: int,
    shard_size: int = 1024,
    views: int = 1,
    augmenter=None,
    seed: int = 0,
    progress=None,
) -> FeatureSet:
    """Run the extractor over `samples` and stream shards into `folder`.

    Memory stays flat: one batch of images and at most one shard of
    features are held at a time. The folder is replaced atomically: readers
    see the old cache or the new one, never a half-written one.

    Args:
        progress: called as progress(done_images, total_images).
    """

    def batches():
        for view in range(views):
            # View v of an image is the same whatever ran before (see
            # `pipeline.make_dataset`'s `view`).
            ds = pipeline.make_dataset(
                samples,
                len(class_names),
                image_size,
                batch_size,
                seed=seed,
                augmenter=augmenter if views > 1 else None,
                deterministic=True,
                view=view,
            )
            paths_ds = tf.data.Dataset.from_tensor_slices(
                [p for p, _ in samples]
            ).batch(batch_size)
            for (images, onehot), paths in zip(ds, paths_ds, strict=True):
                yield (
                    extractor.predict_on_batch(images),
                    np.argmax(np.asarray(onehot), axis=1),
                    [p.decode() for p in paths.numpy()],
                    view,
                )

    return write_features(
        batches(),
        folder,
        fields,
        class_names=class_names,
        num_images=len(samples),
        views=views,
        shard_size=shard_size,
        progress=progress,
    )


def write_features(
    batches,
    folder,
    fields,
    *,
    class_names,
    num_images: int,
    views: int,
    shard_size: int = 1024,
    progress=None,
) -> FeatureSet:
    """Stream (features, labels, paths, view) batches, view-major in data
    order, into shards of a new cache folder `folder` (replaced atomically;
    at most one shard is held in memory)."""
    folder = Path(folder)
    # Half-written caches of this folder left by killed processes.
    rundir.remove_dead_temporaries(folder.parent, f".{folder.name}.*-*")
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    total = num_images * views
    shards, buf_f, buf_l, buf_p, buf_v = [], [], [], [], []
    dim = None
    done = 0

    def flush():
        nonlocal buf_f, buf_l, buf_p, buf_v
        if not buf_f:
            return
        name = f"shard-{len(shards):05d}.npz"
        with atomic_path(tmp / name) as t:
            with open(t, "wb") as f:
                np.savez(
                    f,
                    features=np.concatenate(buf_f).astype("float32"),
                    labels=np.concatenate(buf_l).astype("int64"),
                    paths=np.concatenate(buf_p).astype(str),
                    views=np.concatenate(buf_v).astype("int32"),
                )
        shards.append(name)
        buf_f, buf_l, buf_p, buf_v = [], [], [], []

    for feats, labels, paths, view in batches:
        feats = np.asarray(feats, dtype="float32")
        dim = feats.shape[1]
        buf_f.append(feats)
        buf_l.append(np.asarray(labels))
        buf_p.append(np.array(paths))
        buf_v.append(np.full(len(feats), view))
        done += len(feats)
        if sum(len(b) for b in buf_f) >= shard_size:
            flush()
        if progress is not None:
            progress(done, total)
        faults.point("extract")
    flush()
    if done != total:
        raise RuntimeError(f"{folder}: wrote {done} rows, expected {total}")
    manifest = {
        "format": FORMAT,
        "num_images": num_images,
        "views": views,
        "feature_dim": int(dim or 0),
        "dtype": "float32",
        "class_names": list(class_names),
        "shards": shards,
        "key": content_key(fields),
        "key_fields": fields,
    }
    write_json(tmp / "manifest.json", manifest)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return FeatureSet(folder, manifest)


@dataclasses.dataclass
class ExtractResult:
    split: str
    folder: Path
    images: int
    feature_dim: int
    seconds: float
    reused: bool
    reason: Optional[str]


def get_features(
    cfg,
    extractor,
    index,
    split,
    folder,
    out,
    *,
    views=1,
    augmenter=None,
    derived=None,
) -> tuple[FeatureSet, ExtractResult]:
    """The cached features of a split: reused when the key matches, else
    recomputed (saying why).

    Args:
        derived: None, or a source of the same features computed another
            way (`activations.DerivedFeatures`: the top of the base over
            cached activations). A cache of directly extracted features
            (`extract`) is still reused first; else the features are
            computed from `derived`, under a key that names it.
    """
    samples = index.splits[split]

    dtype = keras.mixed_precision.global_policy().compute_dtype
    fields = key_fields(
        cfg,
        samples,
        views=views,
        augmentation=cfg.augmentation if views > 1 else None,
        dtype=dtype,
    )
    t0 = time.monotonic()
    cached, why = open_cache(folder, fields)
    if cached is None and derived is not None:
        fields = {**fields, "derived_from": derived.source}
        cached, why = open_cache(folder, fields)
    if cached is not None:
        out.info(
            f"features [{split}]: reusing {folder} ({cached.num_rows} rows, "
            f"key {cached.manifest['key'][:12]})"
        )
        return cached, ExtractResult(
            split,
            Path(folder),
            len(samples),
            cached.manifest["feature_dim"],
            0.0,
            True,
            None,
        )
    if why != "no cache yet":
        out.info(f"features [{split}]: recomputing, cache out of date: {why}")
    total = len(samples) * views
    if derived is not None:
        batches = derived.batches(split, views)
        with out.counter(total, f"features [{split}] from {derived.source}") as p:
            fs = write_features(
                batches,
                folder,
                fields,
                class_names=index.class_names,
                num_images=len(samples),
                views=views,
                shard_size=cfg.feature_cache.shard_size,
                progress=p,
            )
    else:
        with out.counter(total, f"extract [{split}]") as progress:
            fs = extract(
                extractor,
                samples,
                index.class_names,
                folder,
                fields,
                image_size=cfg.data.image_size,
                batch_size=cfg.data.batch_size,
                shard_size=cfg.feature_cache.shard_size,
                views=views,
                augmenter=augmenter,
                seed=cfg.experiment.seed,
                progress=progress,
            )
    seconds = time.monotonic() - t0
    return fs, ExtractResult(
        split,
        Path(folder),
        len(samples),
        fs.manifest["feature_dim"],
        seconds,
        False,
        why,
    )


def extract_command(cfg, out, split: str = "all", out_dir=None) -> list[ExtractResult]:
    """`finetune-cli extract`: features of one or all splits to disk."""
    from finetune_cli.runtime import environment
    from finetune_cli.errors import ConfigError

    from finetune_cli.config import checks
    from finetune_cli.data import preflight as preflight_lib

    checks.check(cfg)
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    # The same pre-flight check as finetune, so both see the same files
    # (and a bad image is a data error naming it, not a crash).
    index, _, save_verdicts = preflight_lib.scan_images(index, cfg, out)
    splits = list(index.splits) if split == "all" else [split]
    for s in splits:
        if s not in index.splits:
            raise ConfigError(
                f"--split {s}: the data has no {s} split (it has "
                f"{', '.join(index.splits)})"
            )
    environment.configure_runtime(cfg, environment.has_gpu())
    extractor = build_extractor(cfg)
    save_verdicts()  # every check passed: now files may be written
    root = Path(out_dir) if out_dir is not None else cache_root(cfg)
    results = []
    for s in splits:
        _, r = get_features(cfg, extractor, index, s, root / s, out)
        results.append(r)
    return results


def cache_root(cfg) -> Path:
    return Path(cfg.feature_cache.dir) / cfg.experiment.name
