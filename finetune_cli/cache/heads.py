"""Training a head on cached features instead of running the frozen base.

A phase whose base is frozen, and that comes before any phase that trains
the base, gets the same base outputs every epoch: `cached_datasets` takes
them from the feature cache (`features.py`) and returns a head model that
shares its layers, and so its weights, with the full model. Training it
trains the full model's head; nothing has to be copied back.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import numpy as np
import tensorflow as tf

from finetune_cli.cache import activations
from finetune_cli.data import pipeline
from finetune_cli.data import multilabel
from finetune_cli.cache import features
from finetune_cli.cache import extract as extract_lib
from finetune_cli.model import build as model_lib


PROBE_EPOCHS = 60
PROBE_BATCH = 64
PROBE_LEARNING_RATE = 1e-3
PROBE_MIN_STEPS = 400


def train_probe(xt, yt, xv, yv, num_classes: int, seed: int, epochs=PROBE_EPOCHS):
    """Multinomial logistic regression on standardised features:
    (the probe model, train accuracy, validation accuracy). Multi-hot `yt`
    and `yv`: a logistic regression per label, scored by mAP instead.

    A fixed schedule (no early stopping on the validation split), so the
    validation accuracy is a score the probe did not choose itself by:
    `epochs` passes over the training rows, and at least `PROBE_MIN_STEPS`
    optimizer steps, so a small set is not left half-trained. One Keras
    epoch of repeated, reshuffled batches: no per-epoch overhead.
    """
    multi = np.asarray(yt).ndim == 2  # multi-hot rows: a sigmoid per label
    keras.utils.set_random_seed(seed)
    norm = keras.layers.Normalization(name="standardise")
    norm.adapt(xt)
    inputs = keras.Input(xt.shape[1:], name="features")
    outputs = keras.layers.Dense(
        num_classes, activation="sigmoid" if multi else "softmax", name="probe"
    )(norm(inputs))
    probe = keras.Model(inputs, outputs, name="probe")
    probe.compile(
        keras.optimizers.Adam(PROBE_LEARNING_RATE),
        "binary_crossentropy" if multi else "sparse_categorical_crossentropy",
    )
    n = len(yt)
    steps = max(PROBE_MIN_STEPS, epochs * -(-n // PROBE_BATCH))
    batches = (
        tf.data.Dataset.from_tensor_slices((xt, np.asarray(yt)))
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(PROBE_BATCH)
        .prefetch(tf.data.AUTOTUNE)
    )
    probe.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)

    def accuracy(x, y):
        if not len(y):
            return 0.0
        probs = probe.predict(x, batch_size=1024, verbose=0)
        if multi:  # mean average precision (Keras' PR-AUC, label-averaged)
            m = keras.metrics.AUC(curve="PR", multi_label=True, num_labels=num_classes)
            m.update_state(y, probs)
            return float(m.result())
        return float(np.mean(np.argmax(probs, axis=1) == y))

    return probe, accuracy(xt, yt), accuracy(xv, yv)


def head_model(model, base):
    """The layers after the base as their own model (sharing weights)."""
    head_layers = model.layers[model.layers.index(base) + 1 :]
    inputs = keras.Input(tuple(base.output.shape[1:]), name="features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    return keras.Model(inputs, x, name="head")


def feature_dataset(
    feats,
    labels,
    num_classes: int,
    batch_size: int,
    *,
    seed: int,
    epochs=None,
    shard=(0, 1),
    per_epoch=None,
    class_weight=None,
    mixer=None,
):
    """Batches of (features, one-hot) from cached features [views, n, d].

    Args:
        epochs: (first, end): the batches of epochs first..end-1 in one
            finite dataset. Epoch e uses view e mod views of every image in
            an order that depends on (seed, e) only, so a resumed phase
            sees the batches an uninterrupted one would. None: one pass in
            data order (validation).
        shard, per_epoch, class_weight: as for `pipeline.make_dataset`.
        mixer: a `pipeline.Mixer` for the training batches (MixUp mixes
            pooled features as it mixes pixels).
    """
    onehot = multilabel.rows(labels, num_classes)
    views, n = feats.shape[0], feats.shape[1]
    if epochs is None:
        ds = tf.data.Dataset.from_tensor_slices((feats[0], onehot))
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    stacked = tf.constant(feats)
    ys = tf.constant(onehot)
    first, end = epochs

    def epoch_batches(e):
        view = tf.math.floormod(e, views)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), e])
        )
        order = order[shard[0] :: shard[1]]
        if per_epoch is not None:
            order = order[:per_epoch]
        batches = tf.data.Dataset.from_tensor_slices(
            (tf.gather(stacked[view], order), tf.gather(ys, order))
        ).batch(batch_size, drop_remainder=per_epoch is not None)
        if mixer is None:
            return batches
        return mixer.apply(batches, lambda b: (e, b))

    ds = tf.data.Dataset.range(first, end).flat_map(epoch_batches)
    if class_weight is not None:
        ds = pipeline.with_sample_weights(ds, class_weight, num_classes)
    return ds.prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass
class CachedData:
    """The head model and the cached features of the train and val splits."""

    head: object
    train: tuple  # (features [views, n, d], labels [n])
    val: tuple
    num_classes: int
    batch_size: int
    seed: int
    mixer: object = None

    def train_dataset(self, first: int, end: int, **distributed):
        """Batches of epochs first..end-1; `distributed` as for
        `feature_dataset` (batch_size, shard, per_epoch, class_weight)."""
        return feature_dataset(
            *self.train,
            self.num_classes,
            distributed.pop("batch_size", self.batch_size),
            seed=self.seed,
            epochs=(first, end),
            mixer=self.mixer,
            **distributed,
        )

    def val_dataset(self):
        return feature_dataset(
            *self.val, self.num_classes, self.batch_size, seed=self.seed
        )


def cached_datasets(
    cfg, out, model, base, index, path: str, strategy=None, cut_layers=None
) -> CachedData:
    """Extract (or reuse) the features a phase on `path` needs.

    Call outside any strategy scope: extraction is a local forward pass on
    each worker. The head model is grafted inside `strategy`'s scope, so
    that it trains under the strategy.

    Args:
        cut_layers: the trainable layers of a later phase on cached
            activations, whose bottom weights are the current ones: the
            features are then computed from that phase's activation cache
            (one pass of the bottom serves both phases).
    """
    preprocess = model_lib.find_preprocessing(model)
    extractor = features.extractor_from(base, preprocess, cfg.data.image_size)
    root = extract_lib.cache_root(cfg)
    views = cfg.feature_cache.views if path == "views" else 1
    augmenter = (
        pipeline.build_augmenter(cfg.augmentation, cfg.experiment.seed)
        if views > 1
        else None
    )
    derived = None
    if cut_layers:
        derived = activations.derived_features(cfg, out, model, base, index, cut_layers)
    train_dir = root / ("train" if views == 1 else f"train-{views}views")
    train_fs, _ = features.get_features(
        cfg,
        extractor,
        index,
        "train",
        train_dir,
        out,
        views=views,
        augmenter=augmenter,
        derived=derived,
    )
    val_fs, _ = features.get_features(
        cfg, extractor, index, "val", root / "val", out, derived=derived
    )
    features.evict(cfg, out)
    f, labels, _ = train_fs.load()
    vf, vlabels, _ = val_fs.load()
    if index.multi_label:  # the cache keeps class indices; label sets are here
        labels, vlabels = (
            multilabel.targets(index.labels(s), len(index.class_names))
            for s in ("train", "val")
        )
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        head = head_model(model, base)
    return CachedData(
        head,
        (f, labels),
        (vf, vlabels),
        len(index.class_names),
        cfg.data.batch_size,
        cfg.experiment.seed,
        pipeline.build_mixer(cfg.augmentation, cfg.experiment.seed),
    )
