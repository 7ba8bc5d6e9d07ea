"""The tf.data pipeline: decode, resize, augment and batch the images that
`data.py` indexed, reproducibly (per-batch augmentation seeds) and in
parallel."""

from __future__ import annotations

import re

import keras
import tensorflow as tf

from finetune_cli.data import multilabel
from finetune_cli.data import records
from finetune_cli.data.decode import decode
from finetune_cli.data.decode import load_pixels
from finetune_cli.data.decode import tf_path
from finetune_cli.data.preflight import pillow_verdict


def load_image(path, image_size):
    """Read, decode (`decode.decode`) and resize one image: float32,
    0-255, [H, W, 3]. `path` may be bytes (file names that are not UTF-8)."""
    if isinstance(path, str):
        path = tf_path(path)
    return load_pixels(tf.io.read_file(path), image_size)


def to_uint8(pixels):
    """Float pixels 0-255 as uint8, rounded (values outside 0-255, which
    brightness or contrast can make, are clipped as a display would)."""
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)


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


# Examples shuffled at once when reading shards (encoded bytes: 2,048
# photos of ~100 KB are ~200 MB); whole shards are shuffled too.
SHUFFLE_BUFFER = 2048


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
    mixer=None,
    pixels: str = "uint8",
):
    """A batched `tf.data.Dataset` of (pixels 0-255, one-hot labels; for
    label sets (multi-label samples), multi-hot rows).

    Pixels are carried as uint8 (`pixels`; "float32" is the old form, kept
    for the benchmark's baseline): a quarter of the bytes of float32 from
    host memory to the device, where the model casts them to float32 at
    its input (Keras casts an input to its `keras.Input`'s dtype inside
    the compiled step). Decoding, resizing, augmenting and mixing run in
    float32 in the pipeline; the batch is rounded to whole pixel values
    last. The model's own input stays float32 pixels 0-255, so exported
    signatures and `predict` take what they always took.

    Args:
        samples: (path, label) pairs, or a `records.RecordSamples` (a
            split of `data.records`: its shards are read instead).
        shuffle: shuffle the order (training), deterministically per seed.
        augmenter: a Keras layer applied to training batches only.
        mixer: a `Mixer` (MixUp, CutMix) applied after `augmenter`, to
            training batches (with `shuffle`).
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
    n = len(samples)
    size = tuple(image_size)
    from_records = isinstance(samples, records.RecordSamples)
    if from_records:  # serialized examples of the split's shards

        def load(r):
            raw, y = records.parse(r, num_classes)
            return load_pixels(raw, size), y

        # The count is the manifest's: Keras then knows where a validation
        # pass ends instead of running out (keras#23360).
        base = records.examples(samples, parallel=False).apply(
            tf.data.experimental.assert_cardinality(n)
        )
    else:
        paths = [tf_path(p) for p, _ in samples]
        labels = [lb for _, lb in samples]
        if multilabel.is_multi(samples):  # label sets: multi-hot rows already
            labels = multilabel.targets(labels, num_classes)

            def load(p, y):
                return load_image(p, size), y
        else:

            def load(p, y):
                return load_image(p, size), tf.one_hot(y, num_classes)

        # One copy of the paths and labels: the whole list in order, and
        # gathered by each epoch's permutation.
        paths_t, labels_t = tf.constant(paths), tf.constant(labels)
        base = tf.data.Dataset.from_tensor_slices((paths_t, labels_t))
    seed64 = tf.constant(seed, tf.int64)

    def shuffled_windows(ds, window: int, e):
        # Examples shuffled `window` at a time, each window by a stateless
        # permutation of (seed, epoch, window): the order is a function of
        # those alone, whatever the global seed.
        def permute(w, rows):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(tf.shape(rows)[0]),
                seed=tf.stack([seed64 * 1_000_003 + e, w]),
            )
            return tf.data.Dataset.from_tensor_slices(tf.gather(rows, order))

        return ds.batch(window).enumerate().flat_map(permute)

    def pipeline(ds, epoch=None):
        ds = ds.map(
            load,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).batch(batch_size, drop_remainder=per_epoch is not None)
        if class_weight is not None:
            ds = with_sample_weights(ds, class_weight, num_classes)
        if augmenter is not None:
            ds = augmented(ds, epoch)
        if mixer is not None and shuffle:
            at = tf.constant(0, tf.int64) if epoch is None else epoch
            ds = mixer.apply(ds, lambda b: (at, b))
        if pixels == "uint8":
            ds = ds.map(
                lambda x, *rest: (to_uint8(x), *rest),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
        return ds

    def augmented(ds, epoch):
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

    def epoch_records(e):
        # Whole shards go to each input pipeline (file-level sharding),
        # in an order of (seed, epoch); examples are then shuffled in a
        # buffer of encoded bytes, seeded the same way.
        files = tf.data.Dataset.from_tensor_slices(
            tf.gather(
                tf.constant(samples.shards), epoch_order(len(samples.shards), seed, e)
            )
        )
        if shard[1] > 1:
            files = files.shard(shard[1], shard[0])
        ds = shuffled_windows(
            records.examples(samples, files=files), min(max(n, 1), SHUFFLE_BUFFER), e
        )
        if per_epoch is not None:  # shards are uneven: never run short
            ds = ds.repeat().take(per_epoch)
        return ds

    def epoch_files(e):
        if from_records:
            return epoch_records(e)
        # Stateless: an op seed that is a tensor meets TensorFlow's global
        # seed in random_seed.get_seed, which fails when that is 0
        # (experiment.seed: 0) by comparing (0, tensor) with (0, 0).
        files = tf.data.Dataset.from_tensor_slices(epoch_order(n, seed, e)).map(
            lambda i: (tf.gather(paths_t, i), tf.gather(labels_t, i))
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
        if from_records:
            base = records.examples(samples)
        buffer = min(max(n, 1), SHUFFLE_BUFFER) if from_records else n
        ds = pipeline(base.shuffle(buffer, seed=seed, reshuffle_each_iteration=True))
    else:
        ds = pipeline(base, epoch=view)
    if deterministic:
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def epoch_order(n: int, seed: int, epoch):
    """The order `make_dataset` reads `n` files in epoch `epoch`: a
    stateless permutation of (seed, epoch) (what a cache of activations
    reads its rows in, too)."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]),
    )


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
    """A `keras.Sequential` of the per-image preprocessing layers, or None
    when there are none (the mixing ops are `build_mixer`'s)."""
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
        elif a.type == "randaugment":
            layers.append(
                keras.layers.RandAugment(
                    value_range=(0, 255), num_ops=a.num_ops, factor=a.factor, seed=s
                )
            )
    return keras.Sequential(layers, name="augmentation") if layers else None


class Mixer:
    """MixUp and CutMix (Keras' layers) over training batches, after the
    per-image ops: pairs of images and their one-hot labels mixed.

    Batches may be images [B, H, W, C] or rows [B, D] (cached pooled
    features, flattened activations: MixUp mixes them as it mixes pixels;
    CutMix needs images). The randomness of batch b of epoch e is a
    function of (seed, e, b) alone, as `reseed` makes it for per-image
    ops, so a resumed run mixes as an uninterrupted one.
    """

    def __init__(self, augmentation, seed: int):
        self.seed = seed
        self.layers = []
        for i, a in enumerate(augmentation):
            if a.type == "mixup":
                layer = keras.layers.MixUp(
                    alpha=a.alpha, seed=seed + i, dtype="float32"
                )
            elif a.type == "cutmix":
                layer = keras.layers.CutMix(
                    factor=a.alpha, seed=seed + i, dtype="float32"
                )
            else:
                continue
            self.layers.append((a.type, layer))

    @property
    def needs_images(self) -> bool:
        return any(kind == "cutmix" for kind, _ in self.layers)

    def apply(self, ds, epoch_and_batch):
        """`ds` of (x, one-hot y, ...) batches, mixed one batch at a time;
        `epoch_and_batch(b)` gives (epoch, batch within it) of the b-th."""

        def mix(b, batch):
            x, y, *rest = batch
            epoch, i = epoch_and_batch(b)
            for k, (_, layer) in enumerate(self.layers):
                with tf.control_dependencies(
                    reseed(layer, self.seed * 31 + 7919 * (k + 1), epoch, i)
                ):
                    x, y = _mixed(layer, x, y)
            return (x, y, *rest)

        return ds.enumerate().map(mix)


def _mixed(layer, x, y):
    flat = len(x.shape) == 2
    images = tf.reshape(x, [-1, 1, 1, tf.shape(x)[-1]]) if flat else x
    out = layer({"images": images, "labels": y}, training=True)
    images = out["images"]
    return (tf.reshape(images, tf.shape(x)) if flat else images), out["labels"]


def build_mixer(augmentation, seed: int):
    """A `Mixer` for the mixing ops of `augmentation`, or None."""
    mixer = Mixer(augmentation, seed)
    return mixer if mixer.layers else None
