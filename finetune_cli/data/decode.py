"""The one image decoder: what training, evaluation, prediction, export's
parity check and the pre-flight check all decode with, so an image the
pre-flight accepts is one training can read, and a photo is upright
(EXIF orientation) the same way everywhere."""

from __future__ import annotations

import os

import tensorflow as tf


def decode(raw):
    """Encoded bytes -> uint8 RGB [H, W, 3], upright: the one decoder of
    training, evaluation, prediction, export's parity check and the
    pre-flight check. The first frame of an animation; the EXIF
    orientation applied (as a phone's photo viewer does)."""
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    orientation = exif_orientation(raw)
    return _orient(image, orientation)


def load_pixels(raw, image_size):
    """Decode and resize encoded image bytes: float32, 0-255, [H, W, 3]
    (a file's bytes, or a record's)."""
    return tf.image.resize(decode(raw), image_size)


# The EXIF block of a JPEG sits in an APP1 segment near the start, after
# the marker "Exif\0\0". It is read with a few TensorFlow ops on the
# first bytes, so the input pipeline stays in C++: reading it with Pillow
# through tf.py_function, tried first, ran at 0.36x the bare decode rate
# in bench/decode.py; these ops at 0.74x (on 2 CPU cores, small JPEGs).
_HEAD = 1 << 13  # the first 8 KiB: APP1 follows SOI (and APP0) in practice
_ENTRIES = 32  # IFD0 entries looked through for the orientation tag


def _bytes(raw, start, n):
    """n bytes of `raw` from `start` as int32 (zeros past the end)."""
    start = tf.clip_by_value(start, 0, tf.strings.length(raw))
    b = tf.io.decode_raw(tf.strings.substr(raw, start, n), tf.uint8)
    return tf.cast(tf.pad(b, [[0, n - tf.shape(b)[0]]]), tf.int32)


def exif_orientation(raw):
    """The EXIF orientation (1-8) of encoded image bytes, as an int32
    scalar tensor; 1 for anything but a JPEG with a readable tag."""
    jpeg = tf.equal(tf.strings.substr(raw, 0, 2), b"\xff\xd8")
    parts = tf.strings.split(
        tf.strings.substr(raw, 0, _HEAD), sep="Exif\x00\x00", maxsplit=1
    )
    found = tf.logical_and(jpeg, tf.size(parts) > 1)
    tiff = tf.strings.length(parts[0]) + 6  # where the TIFF header starts
    head = _bytes(raw, tiff, 8)  # byte order, 42, offset of IFD0
    little = tf.equal(head[0], 0x49)  # "II": little-endian; "MM": big

    def word(lo_hi):  # [..., 2] bytes in file order -> their 16-bit value
        return tf.where(
            little,
            lo_hi[..., 0] + 256 * lo_hi[..., 1],
            256 * lo_hi[..., 0] + lo_hi[..., 1],
        )

    offset = tf.where(
        little,
        word(head[4:6]) + 65536 * word(head[6:8]),
        65536 * word(head[4:6]) + word(head[6:8]),
    )
    ifd = _bytes(raw, tiff + offset, 2 + 12 * _ENTRIES)
    count = word(ifd[0:2])
    entries = tf.reshape(ifd[2:], [_ENTRIES, 12])
    hits = tf.logical_and(
        tf.equal(word(entries[:, 0:2]), 0x0112), tf.range(_ENTRIES) < count
    )
    value = word(entries[tf.argmax(tf.cast(hits, tf.int32)), 8:10])
    ok = found & tf.reduce_any(hits) & (value >= 1) & (value <= 8)
    return tf.where(ok, value, 1)


def _orient(image, orientation):
    """Turn `image` upright for its EXIF orientation, without branches (a
    branch is a function call per image in tf.data): a transpose for 5-8,
    then flips, as PIL.ImageOps.exif_transpose does. Identity operations
    forward their input, so an upright photo costs nothing."""
    o = orientation
    transpose = o >= 5
    flip_lr = tf.reduce_any(tf.equal(o, [2, 3, 6, 7]))  # mirror left-right
    flip_ud = tf.reduce_any(tf.equal(o, [3, 4, 7, 8]))  # mirror top-bottom
    out = tf.transpose(image, tf.where(transpose, [1, 0, 2], [0, 1, 2]))
    out = tf.reverse(out, tf.boolean_mask([1, 0], tf.stack([flip_lr, flip_ud])))
    out.set_shape([None, None, 3])
    return out


def tf_path(path):
    """A path as TensorFlow takes it: bytes, so names that are not UTF-8
    (kept by Python as surrogate escapes) reach the file system intact."""
    return os.fsencode(path)


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def _decoded_shape(path):
    # One graph call per image: eager op by op would dispatch ~40 ops each.
    return tf.shape(decode(tf.io.read_file(path)))


def verdict(path) -> str | None:
    """Why this decoder cannot read `path`, or None when it can."""
    try:
        _decoded_shape(tf_path(path))
    except (tf.errors.OpError, ValueError) as e:
        import re

        text = (getattr(e, "message", None) or str(e)).strip()
        text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)  # graph node names
        first = (text.splitlines() or [type(e).__name__])[0]
        return (
            f"TensorFlow's decoder, which training uses, cannot read it ({first[:120]})"
        )
    return None
