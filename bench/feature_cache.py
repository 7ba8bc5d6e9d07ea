"""Benchmark: a 10-epoch head phase, hand-written vs through the feature cache.

Both run in this process on the same data and split:

- hand-written: the Keras guide's recipe, a frozen base inside the model,
  so every epoch runs the base over every training and validation image;
- cached: what `finetune` does for such a phase: extract features once
  (cold cache, timed), then train the same head on them for the same epochs.

Prints wall times, their ratio, and held-out (test split) accuracy of both;
the cached head is grafted back onto the base and evaluated on real images.

    python bench/feature_cache.py \
        --data ../shared/assets/flower_photos \
        --weights ../shared/assets/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _assets import missing  # noqa: E402
from _assets import parser  # noqa: E402
import _results


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    args = p.parse_args(argv)
    if missing(args):
        return 0

    import keras
    import numpy as np

    from finetune_cli import config as config_lib
    from finetune_cli.data import index as data_lib
    from finetune_cli.data import pipeline
    from finetune_cli.model import build as model_lib
    from finetune_cli.cache import heads as feature_training
    from finetune_cli.train import phases as phases_lib
    from finetune_cli.console import Output

    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    cfg = config_lib.validate(
        {
            "experiment": {
                "name": "bench",
                "seed": 42,
                "output_dir": str(tmp / "runs"),
            },
            "data": {
                "dir": args.data,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "split": {"train": 0.8, "val": 0.1, "test": 0.1},
            },
            "model": {"name": "MobileNetV2", "weights": args.weights},
            "phases": [
                {
                    "name": "head",
                    "epochs": args.epochs,
                    "learning_rate": args.learning_rate,
                }
            ],
            "feature_cache": {"dir": str(tmp / "features")},
        }
    )
    index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    k = len(index.class_names)
    size = cfg.data.image_size
    mk = lambda split: pipeline.make_dataset(  # noqa: E731
        index.splits[split], k, size, args.batch_size, shuffle=split == "train", seed=42
    )
    print(
        f"data: {args.data}: {k} classes, "
        + ", ".join(f"{s} {len(v)}" for s, v in index.splits.items())
    )
    print(
        f"model: MobileNetV2 {size[0]}x{size[1]}, weights {args.weights}; "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam "
        f"{args.learning_rate:g}"
    )

    # Hand-written recipe (keras.io transfer-learning guide).
    keras.utils.set_random_seed(42)
    base = keras.applications.MobileNetV2(
        weights=args.weights, include_top=False, input_shape=(*size, 3), pooling="avg"
    )
    base.trainable = False
    inputs = keras.Input((*size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    outputs = keras.layers.Dense(k, activation="softmax")(x)
    hand = keras.Model(inputs, outputs)
    hand.compile(
        keras.optimizers.Adam(args.learning_rate),
        "categorical_crossentropy",
        metrics=["accuracy"],
    )
    t0 = time.perf_counter()
    hand.fit(mk("train"), validation_data=mk("val"), epochs=args.epochs, verbose=0)
    t_hand = time.perf_counter() - t0
    acc_hand = hand.evaluate(mk("test"), verbose=0, return_dict=True)["accuracy"]
    print(f"hand-written: {t_hand:.1f}s, test accuracy {acc_hand:.4f}")

    # Through the cache, as finetune runs a frozen-base phase.
    keras.utils.set_random_seed(42)
    model, base = model_lib.build_model(cfg, k)
    plans = phases_lib.plan_phases(model, base, cfg)
    assert [p.path for p in plans] == ["features"]
    out = Output(file=open(os.devnull, "w"))
    t0 = time.perf_counter()
    cached = feature_training.cached_datasets(cfg, out, model, base, index, "features")
    t_extract = time.perf_counter() - t0
    head = cached.head
    phases_lib.compile_phase(head, cfg.phases[0], 1, k, False)
    head.fit(
        cached.train_dataset(0, args.epochs),
        validation_data=cached.val_dataset(),
        epochs=args.epochs,
        steps_per_epoch=cached.steps_per_epoch,
        verbose=0,
    )
    t_cache = time.perf_counter() - t0
    phases_lib.compile_phase(model, cfg.phases[0], 1, k, False)
    acc_cache = model.evaluate(mk("test"), verbose=0, return_dict=True)["accuracy"]
    print(
        f"cached: {t_cache:.1f}s (extract {t_extract:.1f}s + head "
        f"{t_cache - t_extract:.1f}s), test accuracy {acc_cache:.4f} "
        "(head grafted on the base, real images)"
    )
    _results.report(
        "feature_cache",
        f"A {args.epochs}-epoch head phase: the hand-written Keras recipe "
        "against the cached path (cold cache, extraction included)",
        ["path", "wall time", "test accuracy"],
        [
            [
                "hand-written (frozen base every epoch)",
                f"{t_hand:.1f} s",
                f"{acc_hand:.4f}",
            ],
            [
                f"feature cache (extract {t_extract:.1f} s + head "
                f"{t_cache - t_extract:.1f} s)",
                f"{t_cache:.1f} s",
                f"{acc_cache:.4f}",
            ],
            [
                "ratio",
                f"{t_hand / t_cache:.1f}x faster",
                f"{100 * (acc_cache - acc_hand):+.2f} points",
            ],
        ],
    )
    np.asarray(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
