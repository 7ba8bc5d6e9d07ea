"""Benchmark: the shipped recipe against the hand-written Keras one.

On the shared flower photos and ImageNet MobileNetV2 weights, one after the
other in this process tree:

1. shipped: `finetune-cli finetune configs/flowers.yaml` (data and weights
   pointed at the assets) in a process of its own, cold caches, then its
   test accuracy from the run's metrics.json;
2. hand-written: the recipe of TensorFlow's "Transfer learning and
   fine-tuning" tutorial as a user writes it, in this process, on the same
   train, validation and test files (the shipped run's split.json):
   augmentation layers (flip, rotation 0.2) and the frozen base inside the
   model, dropout 0.2, Adam 1e-4 for 8 epochs; then `base.trainable = True`
   with its first 100 layers frozen, RMSprop 1e-5, 5 more epochs.

With a holdout (`--holdout DIR`, or `--holdout-share 0.2` carving one out
of --data with the same draw as bench/recipe_candidates.py), both recipes
train on the rest (train 0.9, val 0.1, no test split) and are scored on
the holdout: photos that no choice of recipe ever saw. The shipped model
is scored as `finetune-cli evaluate RUN --data HOLDOUT`, and again with
`--tta flip`.

Wall time is measured around each (the shipped one includes its process
start and import, extraction, the pre-flight check and its own test
evaluation; the hand-written one starts after TensorFlow was imported).
Prints both test accuracies, both wall times and the ratio.

    python bench/recipe.py
    python bench/recipe.py --config my.yaml      # another shipped config
    python bench/recipe.py --split-seed 1        # another split (both recipes)
    python bench/recipe.py --holdout-share 0.2   # scored on a carved holdout
    python bench/recipe.py --holdout ~/tf_flowers_extra   # on your own photos
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets
import _results  # noqa: E402


def shipped(config: Path, args, work: Path, holdout=None):
    """(wall seconds, test or holdout accuracy, run folder, holdout
    accuracy with flip TTA or None) of the shipped recipe."""
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["dir"] = args.data
    cfg["model"]["weights"] = args.weights
    if holdout is not None:
        cfg["data"]["split"] = {"train": 0.9, "val": 0.1, "test": 0.0}
    cfg["experiment"]["output_dir"] = "runs"
    if args.split_seed is not None:
        cfg["experiment"]["seed"] = args.split_seed
    path = work / "shipped.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    wall, _ = _assets.run_cli("finetune", path, cwd=work)
    run = work / "runs" / cfg["experiment"]["name"] / "latest"
    if holdout is None:
        return wall, _assets.test_accuracy(run), run, None
    scores = []
    for name, extra in (("holdout", []), ("holdout-tta", ["--tta", "flip"])):
        _, _, text = _assets.run_cli(
            "evaluate",
            run,
            "--data",
            holdout,
            "--name",
            name,
            "--json",
            *extra,
            cwd=work,
            stdout=True,
        )
        scores.append(json.loads(text)["summary"]["accuracy"])
    return wall, scores[0], run, scores[1]


def hand_written(run: Path, args, holdout=None) -> tuple[float, float]:
    """(wall seconds, test or holdout accuracy) of the tutorial recipe on
    `run`'s split."""
    import keras

    from finetune_cli.data import pipeline
    from finetune_cli.data import split as split_lib

    index = split_lib.load(run)
    k = len(index.class_names)
    size = (224, 224)

    def data(name, shuffle=False):
        return pipeline.make_dataset(
            index.splits[name], k, size, 32, shuffle=shuffle, seed=args.seed
        )

    t0 = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    base = keras.applications.MobileNetV2(
        input_shape=(*size, 3), include_top=False, weights=args.weights
    )
    base.trainable = False
    augment = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)]
    )
    inputs = keras.Input((*size, 3))
    x = augment(inputs)
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(k)(x)
    model = keras.Model(inputs, outputs)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-4), loss, metrics=["accuracy"])
    train, val = data("train", shuffle=True), data("val")
    model.fit(train, validation_data=val, epochs=8, verbose=0)
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(keras.optimizers.RMSprop(1e-5), loss, metrics=["accuracy"])
    model.fit(train, validation_data=val, epochs=13, initial_epoch=8, verbose=0)
    wall = time.perf_counter() - t0
    if holdout is None:
        test = data("test")
    else:
        from finetune_cli.data import index as index_lib

        held = index_lib.index_whole_folder(holdout, "--holdout")
        if held.class_names != index.class_names:
            raise SystemExit(f"--holdout classes {held.class_names} differ")
        test = pipeline.make_dataset(held.splits["all"], k, size, 32)
    acc = model.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    return wall, acc


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    p.add_argument(
        "--config",
        type=Path,
        default=_assets.ROOT / "configs" / "flowers.yaml",
        help="The shipped config (default: configs/flowers.yaml).",
    )
    p.add_argument("--seed", type=int, default=42, help="The hand-written seed.")
    p.add_argument(
        "--split-seed",
        type=int,
        help="experiment.seed of the shipped run (it draws the split both "
        "recipes use; default: the config's).",
    )
    _assets.holdout_args(p)
    args = p.parse_args(argv)
    if _assets.missing(args):
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    args.data, holdout = _assets.resolve_holdout(args, work)
    on = "test" if holdout is None else "holdout"
    s_wall, s_acc, run, s_tta = shipped(args.config, args, work, holdout)
    print(f"shipped ({args.config.name}): {on} {s_acc:.4f}, {s_wall:.0f} s", flush=True)
    h_wall, h_acc = hand_written(run, args, holdout)
    print(f"hand-written: {on} {h_acc:.4f}, {h_wall:.0f} s", flush=True)
    seed = args.split_seed if args.split_seed is not None else "the config's"
    rows = [
        ["hand-written Keras tutorial recipe", f"{h_acc:.4f}", f"{h_wall:.0f} s"],
        [f"{args.config.name} as shipped", f"{s_acc:.4f}", f"{s_wall:.0f} s"],
        [
            "shipped vs hand-written",
            f"{(s_acc - h_acc) * 100:+.1f} points",
            f"{s_wall / h_wall:.2f}x",
        ],
    ]
    if s_tta is not None:
        rows.insert(2, ["the same, evaluated with --tta flip", f"{s_tta:.4f}", ""])
    where = (
        f"split seed {seed}"
        if holdout is None
        else f"scored on a holdout kept out of all choosing ({holdout})"
    )
    _results.report(
        "recipe",
        f"The shipped recipe against the hand-written Keras tutorial recipe, {where}",
        ["recipe", f"{on} accuracy", "wall"],
        rows,
    )
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
