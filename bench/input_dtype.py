"""Benchmark: uint8 pixels from the input pipeline against float32.

The training pipeline carries uint8 pixels to the model, which casts them
to float32 at its input inside the compiled step (`pipeline.make_dataset`);
the baseline is the same pipeline with `pixels="float32"` (what it did
before). Both train MobileNetV2 (the whole model, on images: the path of
a phase that cannot use a cache) for the same steps on the same images,
interleaved, best of `--repeats`; printed: images/s of each and the ratio,
and the bytes of one batch.

Where the model runs on a GPU the float32 copy from host memory is the
bottleneck (issue 28 measured 2.1x for MobileNetV2 and 1.45x for ResNet50
on an H200 with uint8 input); on a CPU the copy is a memory move, and the
ratio shows only that uint8 costs nothing there.

    python bench/input_dtype.py
    python bench/input_dtype.py --model ResNet50 --batch 64 --steps 20
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets
import _results  # noqa: E402


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    p.add_argument("--model", default="MobileNetV2")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"skipped: need {args.data}")
        return 0
    import keras
    import tensorflow as tf

    from finetune_cli import config as config_lib
    from finetune_cli.data import index as index_lib
    from finetune_cli.data import pipeline
    from finetune_cli.model import build as model_lib

    index = index_lib.index_whole_folder(args.data, "--data")
    k = len(index.class_names)
    samples = index.splits["all"][: args.batch * args.steps]
    cfg = config_lib.validate(
        {
            "data": {"dir": args.data, "image_size": args.size},
            "model": {"name": args.model, "weights": "none"},
            "phases": [{"name": "all", "epochs": 1, "trainable": "all"}],
        }
    )
    keras.utils.set_random_seed(0)
    model, _ = model_lib.build_model(cfg, k)
    model.trainable = True
    model.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy")

    def data(pixels):
        ds = pipeline.make_dataset(
            samples, k, (args.size, args.size), args.batch, pixels=pixels
        )
        return ds.cache()  # decoded once: the copy and the step are timed

    sets = {pixels: data(pixels) for pixels in ("float32", "uint8")}
    for ds in sets.values():  # fill the caches, trace the steps
        model.fit(ds, epochs=1, verbose=0)
    best = {}
    for _ in range(args.repeats):
        for pixels, ds in sets.items():
            t0 = time.perf_counter()
            model.fit(ds, epochs=1, verbose=0)
            rate = len(samples) / (time.perf_counter() - t0)
            best[pixels] = max(best.get(pixels, 0.0), rate)
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    batch_bytes = {
        pixels: args.batch * args.size * args.size * 3 * (1 if pixels == "uint8" else 4)
        for pixels in sets
    }
    _results.report(
        "input_dtype",
        f"uint8 pixels vs float32 from the input pipeline, {args.model} "
        f"{args.size} px, batch {args.batch}, whole model trained, {device}",
        ["pixels", "images/s (best of repeats)", "bytes a batch"],
        [
            [
                "float32 (before)",
                f"{best['float32']:.1f}",
                f"{batch_bytes['float32']:,}",
            ],
            ["uint8 (now)", f"{best['uint8']:.1f}", f"{batch_bytes['uint8']:,}"],
            ["uint8 vs float32", f"{best['uint8'] / best['float32']:.2f}x", "0.25x"],
        ],
        note=f"{args.steps} steps of {args.batch} flower photos, decoded once "
        f"and cached; {args.repeats} interleaved repeats.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
