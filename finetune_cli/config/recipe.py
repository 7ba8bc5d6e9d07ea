"""The default recipe, and the config `finetune-cli init` writes with it.

The recipe was chosen by measurement (docs/recipes.md: "The default
recipe"): `bench/recipe_candidates.py` compared candidates over three
seeds on the flower photos with MobileNetV2, and `bench/recipe.py` compares
the winner with the hand-written Keras recipe. `configs/flowers.yaml` is
this recipe for the flower photos; a test keeps the two the same.

The fine-tune phase trains whole blocks at the top of the base, BN frozen.
For MobileNetV2 that is from `block_11_expand` (blocks 11 to 16 and the last
convolution): the top `TOP_FRACTION` of its layers. Other bases were not
measured; for them `init` starts the phase at the block boundary nearest the
same fraction, and the file it writes says so. A block boundary is where
one tensor alone crosses from the layers below to the layers above, so the
frozen bottom's activations can be cached there.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

import yaml

from finetune_cli.model import applications
from finetune_cli.errors import ConfigError, DataError

MEASURED_MODEL = "MobileNetV2"
MEASURED_FIRST_LAYER = "block_11_expand"
# MobileNetV2's base (avg pooling) has 154 layers; block_11_expand starts
# the top 57 of them.
TOP_FRACTION = 0.37

HEAD = [{"type": "dropout", "rate": 0.2}]
AUGMENTATION = [
    {"type": "flip", "mode": "horizontal"},
    {"type": "rotation", "factor": 0.1},
    {"type": "zoom", "factor": 0.1},
]


# Adam with Keras' moving average of the weights: chosen over plain Adam on
# the pool left after a 20% holdout (bench/recipe_candidates.py
# --holdout-share 0.2), mean of three splits.
OPTIMIZER = {"name": "adam", "use_ema": True, "ema_momentum": 0.9}


def phases(trainable) -> list[dict]:
    """The recipe's two phases, the second training `trainable`."""
    return [
        {
            "name": "head",
            "epochs": 20,
            "trainable": "none",
            "optimizer": dict(OPTIMIZER),
            "learning_rate": 1e-3,
            "label_smoothing": 0.1,
        },
        {
            "name": "fine-tune",
            "epochs": 2,
            "trainable": trainable,
            "batchnorm": "frozen",
            "optimizer": dict(OPTIMIZER),
            "learning_rate": 2e-4,
            "schedule": "cosine",
            "label_smoothing": 0.1,
        },
    ]


# The start of a layer name up to its block number: block_11 (MobileNetV2),
# conv5_block1 (ResNet), block6a (EfficientNet), expanded_conv_7
# (MobileNetV3), convnext_tiny_stage_2_block_5 (ConvNeXt).
_BLOCK = re.compile(r"^[A-Za-z][A-Za-z_]*?_?\d+[a-z]?(?:_[A-Za-z]+_?\d+[a-z]?)*")


def _auto_named(layer) -> bool:
    """Whether Keras named the layer from its class (conv2d_64): such names
    change with what else was built in the process, so a config cannot
    name them."""
    # Keras' own snake-casing of the class name (Conv2D -> conv2d).
    snake = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", type(layer).__name__)
    snake = re.sub("([a-z])([A-Z])", r"\1_\2", snake)
    return re.fullmatch(rf"{snake.lower()}(_\d+)?", layer.name) is not None


def block_starts(layers) -> list[int]:
    """Indices into `layers` (a base's layers, input excluded, in order)
    where a block starts: the layer name's block part changes there and
    one tensor alone crosses from the layers below to the layers from it on.
    """
    position = {id(la): i for i, la in enumerate(layers)}
    spans = {}  # tensor id -> (index of its producer, index of last consumer)

    def use(tensor, at: int) -> int:
        op = tensor._keras_history[0]
        if id(op) not in position:
            # An op that is not a layer (x + y in ConvNeXt) runs right after
            # the last of its inputs is made, and uses them all there.
            inputs = op._inbound_nodes[0].input_tensors if op._inbound_nodes else []
            position[id(op)] = max((use(t, -1) for t in inputs), default=-1)
            for t in inputs:
                use(t, position[id(op)])
        made = position[id(op)]
        last = spans.get(id(tensor), (made, at))[1]
        spans[id(tensor)] = (made, max(last, at))
        return made

    for i, layer in enumerate(layers):
        for tensor in layer._inbound_nodes[0].input_tensors:
            use(tensor, i)
    # A tensor crosses boundaries made+1 .. last: count them by differences.
    crossing = [0] * (len(layers) + 2)
    for made, last in spans.values():
        if last > made:
            crossing[made + 1] += 1
            crossing[last + 1] -= 1
    for b in range(1, len(crossing)):
        crossing[b] += crossing[b - 1]
    starts, block = [], None
    for i, layer in enumerate(layers):
        match = _BLOCK.match(layer.name)
        if match and match.group(0) != block:
            if i > 0 and crossing[i] == 1:
                starts.append(i)
            block = match.group(0)
    return starts


def fine_tune_trainable(base, model: str) -> tuple[dict, str]:
    """The fine-tune phase's `trainable` for `base`, and a line saying why.

    `{from_layer: NAME}` at the block start nearest `TOP_FRACTION` of the
    layers from the top; `{top: N}` when that layer's name is one Keras
    generated, or when no block starts within 0.1 of the fraction.
    """
    from finetune_cli.model import build as model_lib

    layers = model_lib.base_layers(base)
    n = len(layers)

    def share(i):
        return abs((n - i) / n - TOP_FRACTION)

    starts = [i for i in block_starts(layers) if share(i) <= 0.1]
    if not starts:
        top = max(1, round(TOP_FRACTION * n))
        return {"top": top}, (
            f"the top {top} of {model}'s {n} layers ({top / n:.0%}); "
            "no block boundary near there"
        )
    i = min(starts, key=lambda s: (share(s), s))
    layer = layers[i]
    part = f"the top {n - i} of {model}'s {n} layers ({(n - i) / n:.0%})"
    if _auto_named(layer):
        return {"top": n - i}, f"{part}, from the block that starts at {layer.name}"
    return {"from_layer": layer.name}, f"from {layer.name}: {part}"


@dataclasses.dataclass
class Generated:
    """What `generate` made: the YAML text and what it found."""

    text: str
    class_names: list[str]
    images: int  # in all splits
    why: str  # where the fine-tune phase starts, and why there


def _dump(section) -> str:
    return yaml.safe_dump(section, sort_keys=False, default_flow_style=None, width=100)


def generate(
    data_dir,
    model: str = MEASURED_MODEL,
    weights: str = "imagenet",
    name: Optional[str] = None,
    image_size: Optional[int] = None,
) -> Generated:
    """The recipe as a config for `data_dir` (a folder, or a `path,label` CSV
    file), checked by the config loader.

    Reads the folder's class folders (no image is decoded) and builds the
    base once, without weights, to find where the fine-tune phase starts.

    Raises:
        ConfigError: unknown model, weights file missing, a bad name or size.
        DataError: the folder is missing or has no class folders, naming it.
    """
    from finetune_cli import config as config_lib
    from finetune_cli.data import index as data_lib

    try:
        app = applications.get(model)
    except KeyError as e:
        raise ConfigError(f"--model: {e.args[0]}") from None
    if weights not in ("imagenet", "none"):
        from finetune_cli.model import weights as weights_lib

        weights_lib.check_weights(weights)
    size = image_size or app.default_size
    where = "csv" if Path(data_dir).suffix.lower() == ".csv" else "dir"
    if name is None:
        folder = Path(data_dir).resolve()
        folder = folder.parent if where == "csv" else folder
        name = re.sub(r"[^A-Za-z0-9._-]", "-", folder.name)
        name = name if re.match(r"^[A-Za-z0-9]", name) else f"run-{name}"
    data = {
        where: str(data_dir),
        "split": {"train": 0.8, "val": 0.1, "test": 0.1},
        "image_size": size,
        "batch_size": 32,
        "on_bad_image": "skip",
    }
    index = data_lib.index_data(config_lib.Data.model_validate(data), seed=42)
    if len(index.class_names) < 2:
        raise DataError(
            f"data.{where}: {data_dir} has one class ({index.class_names[0]}); "
            "a classifier needs at least 2"
        )
    images = sum(len(samples) for samples in index.splits.values())
    base_cfg = config_lib.Model(name=app.name, weights="none", pooling="avg")
    from finetune_cli.model import build as model_lib

    trainable, why = fine_tune_trainable(
        model_lib.build_base(base_cfg, (size, size)), app.name
    )
    raw = {
        "experiment": {"name": name, "seed": 42, "output_dir": "runs"},
        "data": data,
        "model": {"name": app.name, "weights": weights, "pooling": "avg"},
        "head": HEAD,
        "augmentation": AUGMENTATION,
        "phases": phases(trainable),
    }
    config_lib.validate(raw, source="the generated config")
    measured = app.name == MEASURED_MODEL
    shown = " ".join(str(data_dir).splitlines())  # a comment is one line
    text = "\n".join(
        [
            f"# Generated by `finetune-cli init` for {shown}: "
            f"{images} images in {len(index.class_names)} classes.",
            "# The default recipe, chosen by measurement on MobileNetV2 "
            "(docs/recipes.md),",
            "# the same as configs/flowers.yaml. "
            "Run: finetune-cli finetune <this file>",
            _dump({"experiment": raw["experiment"]}).rstrip(),
            "# on_bad_image: skip leaves out unreadable images and the held-out "
            "copy of a duplicate,",
            "# listing them in the run folder (skipped_images.txt).",
            _dump({"data": data}).rstrip(),
            "# imagenet downloads the weights once; or a local .h5 file.",
            _dump({"model": raw["model"]}).rstrip(),
            _dump({"head": HEAD}).rstrip(),
            "# Trained through the caches (the defaults): 2 augmented views of "
            "every training image;",
            "# the frozen bottom of the base runs once per view.",
            _dump({"augmentation": AUGMENTATION}).rstrip(),
            "# Head, then whole blocks at the top of the base, BN frozen,",
            f"# {why}"
            + (
                "."
                if measured
                else f"\n# (the share measured best on {MEASURED_MODEL}; "
                f"not measured on {app.name})."
            ),
            _dump({"phases": raw["phases"]}).rstrip(),
            "",
        ]
    )
    return Generated(text, index.class_names, images, why)


def check_out(path, force: bool = False) -> None:
    """A config file may be written at `path`: not a folder, and not an
    existing file without `force` (checked before any work that ends in
    `write`, so a refusal costs nothing).

    Raises:
        ConfigError: naming `--out` and the path.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a folder; expected a file path")
    if path.exists() and not force:
        raise ConfigError(f"--out: {path} exists; pass --force to replace it")


def write(path, text: str, force: bool = False) -> None:
    """Write the config file atomically; an existing file only with `force`.

    Raises:
        ConfigError: the file exists (without `force`), is a folder, or
            cannot be written.
    """
    from finetune_cli.files import atomic_write

    path = Path(path)
    check_out(path, force)
    try:
        atomic_write(path, text)
    except OSError as e:
        raise ConfigError(f"--out: cannot write {path}: {e.strerror}") from None
