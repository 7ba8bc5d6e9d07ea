"""Benchmark: peak memory of `predict` on N images and on 4N.

`finetune-cli predict` streams images through the model in batches; the
baseline, measured in the same run, is what predict did before: decode
every image into memory, then run the model. Each run is its own process,
so each peak RSS is its own.

    python bench/predict_memory.py                  # the flower photos
    python bench/predict_memory.py --per-class 100 --image-size 96

Prints images, seconds and peak RSS of each, and the ratios 4N / N.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _assets import missing
from _assets import parser
import _results

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, os, resource, sys, time
mode, model, listing = sys.argv[1:4]
files = open(listing).read().split()
t0 = time.perf_counter()
if mode == "stream":
    from finetune_cli.cli.main import app
    try:
        app(["predict", model, *files, "--out", listing + ".csv", "--quiet"],
            prog_name="finetune-cli")
    except SystemExit as e:
        assert e.code == 0, e.code
else:
    import numpy as np
    import keras
    from finetune_cli.data import pipeline
    m = keras.saving.load_model(model, compile=False)
    size = tuple(m.input_shape[1:3])
    x = np.stack([np.asarray(pipeline.load_image(f, size)) for f in files])
    m.predict(x, batch_size=32, verbose=0)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"images": len(files), "seconds": time.perf_counter() - t0,
                  "peak_rss_mib": rss}))
"""


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--per-class", type=int, default=147, help="N / classes.")
    p.add_argument("--image-size", type=int, default=96)
    args = p.parse_args(argv)
    if missing(args):
        return 0
    import keras

    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    base = keras.applications.MobileNetV2(
        include_top=False,
        weights=None,
        input_shape=(args.image_size, args.image_size, 3),
        pooling="avg",
    )
    base.load_weights(args.weights, skip_mismatch=False)
    root = Path(args.data)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    inputs = keras.Input((args.image_size, args.image_size, 3))
    x = keras.applications.mobilenet_v2.preprocess_input(inputs)
    outputs = keras.layers.Dense(len(classes), activation="softmax")(base(x))
    model_path = tmp / "model.keras"
    keras.Model(inputs, outputs).save(model_path)
    (tmp / "labels.txt").write_text("\n".join(classes) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for n in (args.per_class, 4 * args.per_class):
        files = [
            str(f)
            for c in classes
            for f in sorted((root / c).iterdir())[:n]
            if f.suffix.lower() in (".jpg", ".jpeg", ".png")
        ]
        listing = tmp / f"files-{n}.txt"
        listing.write_text("\n".join(files))
        for mode in ("decode-all-first", "stream"):
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, mode, str(model_path), str(listing)],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(mode, n)] = r
            print(
                f"{mode:17} {r['images']:5d} images  {r['seconds']:6.1f} s  "
                f"peak RSS {r['peak_rss_mib']:6.0f} MiB",
                flush=True,
            )
    table = []
    for mode in ("decode-all-first", "stream"):
        small = results[(mode, args.per_class)]
        large = results[(mode, 4 * args.per_class)]
        ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        table.append(
            [mode, f"x{large['images'] / small['images']:.2f}", f"x{ratio:.2f}"]
        )
    _results.report(
        "predict_memory",
        "Peak RSS of predict against the number of images",
        ["path", "images ratio", "peak RSS ratio"],
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
