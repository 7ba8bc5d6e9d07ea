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
    orientation = tf.py_function(exif_orientation, [raw], tf.int32)
    return _orient(image, orientation)


def exif_orientation(raw) -> int:
    """The EXIF orientation tag (1-8) of encoded image bytes, 1 when there
    is none (Pillow reads the header only)."""
    import io

    from PIL import Image

    try:
        data = raw.numpy() if hasattr(raw, "numpy") else raw
        with Image.open(io.BytesIO(data)) as im:
            value = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - no readable EXIF: as stored
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(image, orientation):
    # EXIF orientation -> the transform that makes the image upright
    # (PIL.ImageOps.exif_transpose's table; rot90 turns counter-clockwise).
    t = tf.image.transpose
    cases = [
        lambda: image,  # 1 (and anything unknown): as stored
        lambda: image,
        lambda: tf.image.flip_left_right(image),  # 2
        lambda: tf.image.rot90(image, 2),  # 3
        lambda: tf.image.flip_up_down(image),  # 4
        lambda: t(image),  # 5: transpose
        lambda: tf.image.rot90(image, 3),  # 6: 90 degrees clockwise
        lambda: tf.image.rot90(t(image), 2),  # 7: transverse
        lambda: tf.image.rot90(image, 1),  # 8: 90 degrees counter-clockwise
    ]
    out = tf.switch_case(tf.clip_by_value(orientation, 0, 8), cases)
    out.set_shape([None, None, 3])
    return out


def tf_path(path):
    """A path as TensorFlow takes it: bytes, so names that are not UTF-8
    (kept by Python as surrogate escapes) reach the file system intact."""
    return os.fsencode(path)


def verdict(path) -> str | None:
    """Why this decoder cannot read `path`, or None when it can."""
    try:
        decode(tf.io.read_file(tf_path(path)))
    except (tf.errors.OpError, ValueError) as e:
        text = (getattr(e, "message", None) or str(e)).strip()
        first = (text.splitlines() or [type(e).__name__])[0]
        return (
            f"TensorFlow's decoder, which training uses, cannot read it ({first[:120]})"
        )
    return None
