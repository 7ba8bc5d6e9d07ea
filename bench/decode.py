"""Benchmark: what the one decoder's EXIF orientation step costs the input
pipeline.

Two passes over the same images, in one process, through `tf.data` with
parallel decoding and a resize to `--size`, as training reads them:

- plain `tf.io.decode_image` + resize (the baseline: what the pipeline did
  before orientation was applied);
- `finetune_cli.data.decode.decode` + resize (reads the EXIF orientation
  with Pillow in a `tf.py_function`, then turns the image upright).

    python bench/decode.py                   # the flower photos
    python bench/decode.py --data DIR --size 224

Prints images per second and the ratio against the baseline.
"""

from __future__ import annotations

import os
import sys
import time

from _assets import missing
from _assets import parser
import _results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--repeat", type=int, default=5, help="Passes per variant.")
    args = p.parse_args(argv)
    if missing(args):
        return 0
    import tensorflow as tf

    from finetune_cli import config as config_lib
    from finetune_cli.data import decode as decode_lib
    from finetune_cli.data import index as data_lib

    index = data_lib.index_data(config_lib.Data(dir=args.data), 42)
    files = [path for samples in index.splits.values() for path, _ in samples]
    size = (args.size, args.size)

    def plain(raw):
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image

    def dataset(decode):
        ds = (
            tf.data.Dataset.from_tensor_slices([decode_lib.tf_path(f) for f in files])
            .map(
                lambda p: tf.image.resize(decode(tf.io.read_file(p)), size),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            .batch(64)
            .prefetch(tf.data.AUTOTUNE)
        )
        for _ in ds.take(1):  # tracing and thread start-up not counted
            pass
        return ds

    def one_pass(ds) -> float:
        t0 = time.perf_counter()
        for _ in ds:
            pass
        return len(files) / (time.perf_counter() - t0)

    # Interleaved passes, the best of each: a busy moment of the machine
    # does not land on one variant only.
    variants = [dataset(plain), dataset(decode_lib.decode)]
    best = [0.0, 0.0]
    for _ in range(args.repeat):
        for i, ds in enumerate(variants):
            best[i] = max(best[i], one_pass(ds))
    base, ours = best
    _results.report(
        "decode",
        f"Decoding {len(files)} images to {args.size}x{args.size} through "
        "tf.data (best of "
        f"{args.repeat} passes)",
        ["decoder", "images/s", "vs baseline"],
        [
            ["tf.io.decode_image (baseline)", f"{base:.0f}", "1.00x"],
            ["decode.decode (EXIF orientation)", f"{ours:.0f}", f"{ours / base:.2f}x"],
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
