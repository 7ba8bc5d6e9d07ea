"""The activation cache: a partly unfrozen phase trains without running the
frozen bottom of the base.

When a phase trains only the top of the base (`trainable: {top: N}`, or
any selection) under `batchnorm: frozen`, every layer below the first
trainable one is a fixed function for the whole phase. The base is cut
there:

- `bottom`: image -> the tensors that cross the cut (one, or several when
  a residual connection crosses it);
- `top`: those tensors -> the base's output, sharing its layers (and so
  its weights) with the full model.

The bottom runs once per image (once per view with augmented views), its
outputs are written as one `.npy` file per view (`feature_cache.
activation_dtype`, float16 by default), and the phase trains
`top + head` on them, reading rows from disk batch by batch (memory flat
in the number of images). Batches come in the full path's order (the same
shuffle of the same seed per epoch), so without augmentation the phase
trains what the full model would; its weights are the full model's.

A cut is refused (the phase runs the base) when the bottom has random
layers (dropout, noise: they act in training and would be frozen into the
cache), when nothing is below the cut, or when the crossing tensors are
larger than the image itself (reading them back would not be cheaper).

On disk, `<feature_cache.dir>/<experiment.name>/activations/<key>/`:
`manifest.json` (crossing tensor names and shapes, views, rows, dtype, the
content key and what it hashes, including the bottom's weights) and
`train-view<k>.npy` [rows, D], `val.npy` [rows, D]: each row is the
crossing tensors flattened and concatenated. `numpy.load` reads them.
"""

from __future__ import annotations

import dataclasses
import hashlib

import keras
import numpy as np
import tensorflow as tf

from finetune_cli.config.schema import per_image
from finetune_cli import faults
from finetune_cli.cache import features
from finetune_cli.cache import extract as extract_lib
from finetune_cli.cache import store
from finetune_cli.model import build as model_lib
from finetune_cli.data import pipeline
from finetune_cli.data import multilabel
from finetune_cli.run.folder import remove_dead_temporaries
from finetune_cli.run.folder import staged_folder
from finetune_cli.files import write_json
from finetune_cli.cache.cut import Cut
from finetune_cli.cache.rows import ActivationSet
from finetune_cli.cache.rows import Rows
from finetune_cli.cache.rows import intact
from finetune_cli.cache.rows import write_rows
from finetune_cli.cache.cut import find_cut
from finetune_cli.cache.cut import training_model


FORMAT = "finetune-cli-activations/1"


def _weights_sha(model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()


def key_fields(cfg, cut: Cut, samples, views: int, dtype: str) -> dict:
    fields = store.key_fields(
        cfg, samples, views=views, augmentation=per_image(cfg.augmentation), dtype=dtype
    )
    # The bottom's weights, not the weights file: an earlier phase may have
    # trained them.
    fields.update(
        weights=f"bottom sha256:{_weights_sha(cut.bottom)}",
        cut=cut.names,
        shapes=[list(s) for s in cut.shapes],
    )
    return fields


# Cache folders this process wrote (so a later phase says "built above").
_BUILT: set = set()


def get_activations(
    cfg, out, model, base, cut: Cut, index, views: int, augmenter
) -> ActivationSet:
    """The cache for this cut, bottom weights and data: reused when its key
    matches, else computed (one pass of the bottom per image and view)."""
    dtype = cfg.feature_cache.activation_dtype
    train, val = index.splits["train"], index.splits["val"]
    fields = key_fields(cfg, cut, train + val, views, dtype)
    key = store.content_key(fields)
    root = extract_lib.cache_root(cfg) / "activations"
    folder = root / key[:16]
    manifest = intact(folder)
    if manifest is not None:
        if manifest.get("key") == key:
            # One built earlier in this process is not "reused".
            built = folder in _BUILT
            how = "the cache built above" if built else "reusing"
            out.info(
                f"activations at {', '.join(cut.names)}: {how} {folder}",
                brief=f"activations: {how if built else 'reusing the cache'}",
            )
            store.used(folder)
            return ActivationSet(folder, manifest)
    preprocess = model_lib.find_preprocessing(model)
    extractor = features.extractor_from(cut.bottom, preprocess, cfg.data.image_size)
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(root, ".*.partial-*")  # every key's leftovers
    # A full disk, a signal, a bug: the half-built cache goes.
    with staged_folder(folder, "make room and run it again") as tmp:
        names = [("train", v, train) for v in range(views)] + [("val", 0, val)]
        total = len(train) * views + len(val)
        done = 0
        label = out.pick(f"activations at {', '.join(cut.names)}", "activations")
        with out.counter(total, label) as progress:

            def rows_of(samples, view, split):
                nonlocal done
                ds = pipeline.make_dataset(
                    samples,
                    len(index.class_names),
                    cfg.data.image_size,
                    cfg.data.batch_size,
                    seed=cfg.experiment.seed,
                    augmenter=augmenter if split == "train" else None,
                    deterministic=True,
                    view=view,
                )
                for images, _ in ds:
                    outs = extractor.predict_on_batch(images)
                    outs = outs if isinstance(outs, (list, tuple)) else [outs]
                    flat = np.concatenate(
                        [np.reshape(o, (len(images), -1)) for o in outs], axis=1
                    )
                    done += len(flat)
                    progress(done)
                    faults.point("extract")
                    yield flat

            for split, view, samples in names:
                target = ActivationSet(tmp, {}).file(split, view)
                write_rows(
                    target,
                    len(samples),
                    cut.row_size,
                    dtype,
                    rows_of(samples, view, split),
                )
        manifest = {
            "format": FORMAT,
            "views": views,
            "rows": {"train": len(train), "val": len(val)},
            "dim": cut.row_size,
            "dtype": dtype,
            "cut": cut.names,
            "shapes": [list(s) for s in cut.shapes],
            "class_names": list(index.class_names),
            "key": key,
            "key_fields": fields,
        }
        write_json(tmp / "manifest.json", manifest)
    _BUILT.add(folder)
    store.used(folder)
    features.evict(cfg, out)
    return ActivationSet(folder, manifest)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order `pipeline.make_dataset` reads files in epoch `epoch`."""
    return np.asarray(pipeline.epoch_order(n, seed, epoch), dtype=np.int64)


@dataclasses.dataclass
class ActivationData:
    """What `trainer` needs of a phase on cached activations."""

    head: object  # the training model (top + head)
    cache: ActivationSet
    labels: dict  # split -> labels [n]
    num_classes: int
    batch_size: int
    seed: int
    mixer: object = None  # a pipeline.Mixer for the training batches

    def _dataset(self, split, epochs, per_epoch=None):
        rows_n = self.cache.manifest["rows"][split]
        dim = self.cache.manifest["dim"]
        views = self.cache.manifest["views"]
        onehot = multilabel.rows(self.labels[split], self.num_classes)
        readers = [
            Rows(self.cache.file(split, v))
            for v in range(views if split == "train" else 1)
        ]
        batch = self.batch_size
        # Rows an epoch yields: all, or only full batches of the first rows.
        per = rows_n if per_epoch is None else per_epoch - per_epoch % batch

        def gen():
            for e in epochs:
                order = (
                    epoch_order(rows_n, self.seed, e)
                    if split == "train"
                    else np.arange(rows_n)
                )[:per]
                reader = readers[e % len(readers)]
                for at in range(0, len(order), batch):
                    idx = order[at : at + batch]
                    yield reader.read(idx).astype("float32"), onehot[idx]

        ds = tf.data.Dataset.from_generator(
            gen,
            output_signature=(
                tf.TensorSpec((None, dim), tf.float32),
                tf.TensorSpec((None, self.num_classes), tf.float32),
            ),
        )
        # A generator's length is unknown to Keras, which then finds the
        # end of every validation pass by running out, and warns that the
        # input "ran out of data" (keras#23360). The length is known here.
        per_epoch_batches = -(-per // batch)
        ds = ds.apply(
            tf.data.experimental.assert_cardinality(len(epochs) * per_epoch_batches)
        )
        if split != "train" or self.mixer is None:
            return ds
        # Epochs are consecutive: the b-th batch is batch b mod n of epoch
        # first + b // n, whatever epoch the dataset starts at.
        first = tf.constant(epochs[0], tf.int64)
        return self.mixer.apply(
            ds, lambda b: (first + b // per_epoch_batches, b % per_epoch_batches)
        )

    def train_dataset(self, first: int, end: int, per_epoch=None):
        """Batches of epochs first..end-1, in `pipeline.make_dataset`'s
        order; epoch e reads view e mod views. Not under tf.distribute."""
        return self._dataset("train", range(first, end), per_epoch).prefetch(2)

    def val_dataset(self):
        return self._dataset("val", [0]).prefetch(2)


@dataclasses.dataclass
class DerivedFeatures:
    """The base's features computed as the top of the cut over cached
    activations, for `features.get_features(derived=...)`.

    A head phase followed by a phase that trains the top of the base would
    otherwise run the whole base once per image (and view) for the head's
    features, then the bottom again for the activations. Computed this way,
    the bottom runs once for both, and the top adds a forward pass over the
    cached rows. The features equal the base's to the activation dtype's
    precision (exactly, to float tolerance, with float32).
    """

    cache: ActivationSet
    top: keras.Model  # rows [batch, D] -> the base's output
    index: object
    batch_size: int

    @property
    def source(self) -> str:
        m = self.cache.manifest
        return f"activations at {', '.join(m['cut'])} ({m['dtype']}, {m['key'][:12]})"

    def batches(self, split: str, views: int):
        """(features, labels, paths, view) batches, view-major in data order."""
        if split not in self.cache.manifest["rows"]:
            raise ValueError(f"no cached activations for the {split} split")
        if split == "train" and views != self.cache.manifest["views"]:
            raise ValueError(
                f"{views} views asked, the activations hold "
                f"{self.cache.manifest['views']}"
            )
        samples = self.index.splits[split]
        # Multi-label rows keep a class index in the cache (the first
        # label); the head reads label sets from the index.
        labels = np.array([_first(lb) for _, lb in samples], "int64")
        paths = [p for p, _ in samples]
        n, step = len(samples), self.batch_size
        for view in range(views if split == "train" else 1):
            reader = Rows(self.cache.file(split, view))
            for at in range(0, n, step):
                stop = min(at + step, n)
                rows = reader.read_range(at, stop).astype("float32")
                yield (
                    self.top.predict_on_batch(rows),
                    labels[at:stop],
                    paths[at:stop],
                    view,
                )


def _first(label) -> int:
    if isinstance(label, tuple):
        return label[0] if label else 0
    return label


def _views_and_augmenter(cfg):
    if not per_image(cfg.augmentation):
        return 1, None
    return cfg.feature_cache.views, pipeline.build_augmenter(
        cfg.augmentation, cfg.experiment.seed
    )


def derived_features(cfg, out, model, base, index, layer_names) -> DerivedFeatures:
    """Fill (or reuse) the cache a later phase training `layer_names` will
    read, and return the base's features computed from it."""
    cut, why = find_cut(base, layer_names)
    if cut is None:
        raise ValueError(why)
    views, augmenter = _views_and_augmenter(cfg)
    cache = get_activations(cfg, out, model, base, cut, index, views, augmenter)
    rows = keras.Input((cut.row_size,), name="activations")
    top = keras.Model(rows, cut.top(cut.split(rows)), name="top")
    return DerivedFeatures(cache, top, index, cfg.data.batch_size)


def activation_datasets(cfg, out, model, base, index, layer_names) -> ActivationData:
    """Cut the base for a phase training `layer_names`, fill (or reuse) the
    cache, and return its data and training model."""
    cut, why = find_cut(base, layer_names)
    if cut is None:
        raise ValueError(why)
    views, augmenter = _views_and_augmenter(cfg)
    cache = get_activations(cfg, out, model, base, cut, index, views, augmenter)
    labels = {
        s: multilabel.targets(index.labels(s), len(index.class_names))
        if index.multi_label
        else np.array(index.labels(s), "int64")
        for s in ("train", "val")
    }
    return ActivationData(
        training_model(model, base, cut),
        cache,
        labels,
        len(index.class_names),
        cfg.data.batch_size,
        cfg.experiment.seed,
        pipeline.build_mixer(cfg.augmentation, cfg.experiment.seed),
    )
