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
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from finetune_cli import remote
from finetune_cli.config.schema import per_image
from finetune_cli.model import applications
from finetune_cli.data import pipeline
from finetune_cli.cache import store
from finetune_cli.cache.store import FeatureSet
from finetune_cli.cache.store import key_fields
from finetune_cli.cache.store import write_features


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


@dataclasses.dataclass
class ExtractResult:
    split: str
    folder: Path
    images: int
    feature_dim: int
    seconds: float
    reused: bool
    reason: Optional[str]


def evict(cfg, out) -> None:
    """Keep the cache folder within `feature_cache.max_size`, once a command
    has all the entries it needs (those it used are kept)."""
    root = remote.local_dir(cfg.feature_cache.dir)
    limit = int(cfg.feature_cache.max_size)
    for folder in store.enforce_limit(root, limit, store.USED):
        out.info(
            f"feature cache over {cfg.feature_cache.max_size.human_readable()}: "
            f"removed the least recently used entry {folder}"
        )


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
        augmentation=per_image(cfg.augmentation) if views > 1 else None,
        dtype=dtype,
    )
    t0 = time.monotonic()
    cached, why = store.lookup(folder, fields)
    if cached is None and derived is not None:
        fields = {**fields, "derived_from": derived.source}
        cached, why = store.lookup(folder, fields)
    if cached is not None:
        out.info(
            f"features [{split}]: reusing {cached.folder} ({cached.num_rows} rows, "
            f"key {cached.manifest['key'][:12]})",
            brief=f"features [{split}]: reusing the cache ({cached.num_rows} rows)",
        )
        return cached, ExtractResult(
            split,
            Path(cached.folder),
            len(samples),
            cached.manifest["feature_dim"],
            0.0,
            True,
            None,
        )
    if why != "no cache yet":
        out.info(f"features [{split}]: cache out of date: {why}; computing a new entry")
    store.set_aside(folder, fields)
    total = len(samples) * views
    if derived is not None:
        batches = derived.batches(split, views)
        label = out.pick(
            f"features [{split}] from {derived.source}", f"features [{split}]"
        )
        with out.counter(total, label) as p:
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
    store.used(fs.folder)
    return fs, ExtractResult(
        split,
        Path(folder),
        len(samples),
        fs.manifest["feature_dim"],
        seconds,
        False,
        why,
    )
