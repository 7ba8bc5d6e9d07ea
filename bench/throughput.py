"""Benchmark: what XLA, mixed precision and steps_per_execution do to
training speed, on the machine at hand (CPU or GPU, any Keras backend).

Trains MobileNetV2 (weights=None: speed does not depend on the weights) on
random 224x224 images held in memory, so the figures are the model's
compute alone, in the two shapes finetune runs:

- `top`: a top phase, the last 38 layers (blocks 13-16) trainable under
  frozen BN, the whole model run every step (what `base every epoch` does);
- `head`: a dense head on 1280 cached features (what cached phases do).

Each setting is a fresh model compiled with `jit_compile` (XLA) on or off,
the `mixed_float16` policy or float32, and `steps_per_execution` 1 or 16 (`--spe`);
it is warmed up (tracing and compilation not counted), then timed over
`--steps` steps. Prints images per second and the ratio to the first row
(float32, no XLA, 1 step per execution), measured in the same process.

    python bench/throughput.py --spe 1 4                # TensorFlow, CPU here
    KERAS_BACKEND=jax python bench/throughput.py --batch 128 --steps 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import _results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(kind, dtype_policy, jit, spe, batch):
    import keras

    keras.mixed_precision.set_dtype_policy(dtype_policy)
    keras.utils.set_random_seed(0)
    if kind == "top":
        base = keras.applications.MobileNetV2(
            include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg"
        )
        start = [la.name for la in base.layers].index("block_13_expand")
        for i, layer in enumerate(base.layers):
            bn = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = i >= start and not bn
        inputs = keras.Input((224, 224, 3))
        x = base(inputs)
    else:
        inputs = keras.Input((1280,))
        x = keras.layers.Dropout(0.2)(inputs)
    outputs = keras.layers.Dense(5, activation="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-4),
        "categorical_crossentropy",
        jit_compile=jit,
        steps_per_execution=spe,
    )
    return model


def images_per_second(kind, policy, jit, spe, batch, steps):
    import numpy as np

    shape = (224, 224, 3) if kind == "top" else (1280,)
    rng = np.random.default_rng(0)
    n = batch * max(spe, 4)
    x = rng.uniform(0, 1, (n, *shape)).astype("float32")
    y = np.eye(5, dtype="float32")[rng.integers(0, 5, n)]
    model = build(kind, policy, jit, spe, batch)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # trace, compile
    reps = max(1, steps * batch // n)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=reps, verbose=0)
    return reps * n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--kinds", nargs="+", default=["top", "head"])
    p.add_argument("--spe", type=int, nargs="+", default=[1, 16])
    p.add_argument(
        "--mixed",
        action="store_true",
        help="Also mixed_float16 (a GPU setting: CPUs have no fast float16).",
    )
    args = p.parse_args(argv)
    import keras

    print(f"backend {keras.backend.backend()}, batch {args.batch}")
    policies = ["float32", "mixed_float16"] if args.mixed else ["float32"]
    table = []
    for kind in args.kinds:
        first = None
        for policy in policies:
            for jit in (False, True):
                for spe in args.spe:
                    rate = images_per_second(
                        kind, policy, jit, spe, args.batch, args.steps
                    )
                    first = first or rate
                    table.append(
                        [kind, policy, "on" if jit else "off", spe]
                        + [f"{rate:,.0f}", f"{rate / first:.2f}x"]
                    )
                    print(f"{kind} {policy} jit={jit} spe={spe}: {rate:,.0f}/s")
    _results.report(
        "throughput",
        f"Training images per second (backend {keras.backend.backend()}, "
        f"batch {args.batch}) against the first row",
        ["model", "policy", "XLA", "steps/exec", "images/s", "vs first row"],
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
