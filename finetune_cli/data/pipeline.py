"""The tf.data pipeline: decode, resize, augment and batch the images that
`data.py` indexed, reproducibly (per-batch augmentation seeds) and in
parallel."""

from __future__ import annotations

import re

import keras
import tensorflow as tf

from finetune_cli.data.decode import decode
from finetune_cli.data.decode import tf_path
from finetune_cli.data.preflight import pillow_verdict


def load_image(path, image_size):
    """Read, decode (`decode.decode`) and resize one image: float32,
    0-255, [H, W, 3]. `path` may be bytes (file names that are not UTF-8)."""
    if isinstance(path, str):
        path = tf_path(path)
    return tf.image.resize(decode(tf.io.read_file(path)), image_size)


def decode_failure(path, error) -> str:
    """Why TensorFlow could not decode `path`, in words (TensorFlow's own
    message names graph nodes, not the problem)."""
    reason = pillow_verdict(str(path))
    if reason is not None:
        return reason
    text = (getattr(error, "message", None) or str(error)).strip()
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text).splitlines()[0]
    return f"cannot decode: {text}"


def find_unreadable(paths, limit: int = 5) -> list[tuple[str, str]]:
    """Files TensorFlow cannot decode, with the reason (at most `limit`).

    Used to name the culprit when decoding fails inside a `tf.data` pipeline,
    whose own error does not say which file it was reading.
    """
    bad = []
    for path in paths:
        try:
            decode(tf.io.read_file(tf_path(path)))
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            bad.append((path, decode_failure(path, e)))
            if len(bad) >= limit:
                break
    return bad


def make_dataset(
    samples,
    num_classes: int,
    image_size,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augmenter=None,
    epochs: tuple[int, int] | None = None,
    deterministic: bool = False,
    shard: tuple[int, int] = (0, 1),
    per_epoch: int | None = None,
    class_weight: dict | None = None,
    view: int | None = None,
):
    """A batched `tf.data.Dataset` of (float32 pixels 0-255, one-hot labels).

    Args:
        samples: (path, label) pairs.
        shuffle: shuffle the order (training), deterministically per seed.
        augmenter: a Keras layer applied to training batches only.
        epochs: (first, end) to build the batches of epochs first..end-1 in
            one finite dataset, each epoch's order a function of (seed,
            epoch) alone: a resumed run sees the same order as one that was
            never interrupted. Without it, the order is reshuffled on every
            pass over the dataset.
        deterministic: augment batch b of epoch e with randomness that is a
            function of (seed, e, b) alone, one batch at a time (with
            `epochs`). Without it, batches are augmented in parallel and
            draw from the layers' shared generators in whatever order the
            threads run.
        shard: (index, count): with `epochs`, this input pipeline reads every
            count-th file of each epoch's shuffled list, from `index`.
        per_epoch: with `epochs`, read this many files of the shard per
            epoch and only full batches (a strategy needs every replica to
            run the same steps).
        class_weight: {class index: weight}, added as sample weights (what
            Keras' `class_weight` does, which a distributed dataset lacks).
        view: without `shuffle`, with `deterministic`: augment batch b as
            view `view` of a feature cache, with randomness that is a
            function of (seed, view, b) alone. The augmentation runs in the
            input pipeline, overlapping the model's forward pass.
    """
    paths = [tf_path(p) for p, _ in samples]
    labels = [lb for _, lb in samples]
    n = len(samples)
    size = tuple(image_size)
    base = tf.data.Dataset.from_tensor_slices((paths, labels))

    def pipeline(ds, epoch=None):
        ds = ds.map(
            lambda p, y: (load_image(p, size), tf.one_hot(y, num_classes)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).batch(batch_size, drop_remainder=per_epoch is not None)
        if class_weight is not None:
            ds = with_sample_weights(ds, class_weight, num_classes)
        if augmenter is None:
            return ds
        if deterministic and epoch is not None:

            def augment(b, xy):
                with tf.control_dependencies(reseed(augmenter, seed, epoch, b)):
                    return (augmenter(xy[0], training=True), *xy[1:])

            # One batch at a time: the generators' state is shared.
            return ds.enumerate().map(augment)
        return ds.map(
            lambda x, *rest: (augmenter(x, training=True), *rest),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def epoch_files(e):
        files = base.shuffle(
            n,
            seed=tf.constant(seed, tf.int64) * 1_000_003 + e,
            reshuffle_each_iteration=False,
        )
        if shard[1] > 1:
            files = files.shard(shard[1], shard[0])
        if per_epoch is not None:
            files = files.take(per_epoch)
        return files

    if shuffle and epochs is not None:
        first, end = epochs
        ds = tf.data.Dataset.range(first, end).flat_map(
            lambda e: pipeline(epoch_files(e), epoch=e)
        )
    elif shuffle:
        ds = pipeline(base.shuffle(n, seed=seed, reshuffle_each_iteration=True))
    else:
        ds = pipeline(base, epoch=view)
    if deterministic:
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def with_sample_weights(ds, class_weight: dict, num_classes: int):
    """(x, one-hot y) batches -> (x, y, the weight of each one's class)."""
    table = tf.constant(
        [float(class_weight.get(i, 1.0)) for i in range(num_classes)], tf.float32
    )
    return ds.map(lambda x, y: (x, y, tf.gather(table, tf.argmax(y, axis=-1))))


def reseed(augmenter, seed: int, epoch, batch) -> list:
    """Set every random generator of `augmenter` to a state that depends on
    (seed, epoch, batch) only; returns the assign ops (graph or eager).

    Keras' random layers take their seed from a generator whose state
    advances on every call, so what a batch gets depends on every call
    before it. Resetting the state per batch makes the augmentation of a
    batch reproducible on its own: the same after a resume, and whatever
    order batches are produced in.
    """
    step = tf.cast(epoch, tf.int64) * (1 << 32) + tf.cast(batch, tf.int64) * 256
    ops = []
    for i, v in enumerate(augmenter.non_trainable_variables):
        state = tf.stack([tf.constant(seed * 1009 + i, tf.int64), step])
        ops.append(v.value.assign(tf.cast(state, v.dtype), read_value=False))
    return ops


def build_augmenter(augmentation, seed: int):
    """A `keras.Sequential` of preprocessing layers, or None when empty."""
    if not augmentation:
        return None
    layers = []
    for i, a in enumerate(augmentation):
        s = seed + i
        if a.type == "flip":
            layers.append(keras.layers.RandomFlip(a.mode, seed=s))
        elif a.type == "rotation":
            layers.append(keras.layers.RandomRotation(a.factor, seed=s))
        elif a.type == "zoom":
            layers.append(keras.layers.RandomZoom((-a.factor, a.factor), seed=s))
        elif a.type == "translation":
            layers.append(keras.layers.RandomTranslation(a.factor, a.factor, seed=s))
        elif a.type == "contrast":
            layers.append(keras.layers.RandomContrast(a.factor, seed=s))
        elif a.type == "brightness":
            layers.append(
                keras.layers.RandomBrightness(a.factor, value_range=(0, 255), seed=s)
            )
    return keras.Sequential(layers, name="augmentation")
